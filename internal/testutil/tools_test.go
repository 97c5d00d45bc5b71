package testutil

import (
	"strings"
	"testing"
)

// recorder is a testing.TB whose Skip and Fatalf only record, so that what
// ToolMissing does can be seen without ending the test.
type recorder struct {
	testing.TB
	skipped, failed string
}

func (r *recorder) Helper() {}

func (r *recorder) Skip(args ...any) {
	if r.skipped == "" && r.failed == "" {
		r.skipped = toString(args)
	}
}

func (r *recorder) Fatalf(format string, args ...any) {
	if r.skipped == "" && r.failed == "" {
		r.failed = format
	}
}

func toString(args []any) string {
	var b strings.Builder
	for _, a := range args {
		if s, ok := a.(string); ok {
			b.WriteString(s)
		}
	}
	return b.String()
}

func TestToolMissing(t *testing.T) {
	for _, tt := range []struct {
		env        string
		skip, fail bool
	}{
		{"", true, false},
		{"0", true, false},
		{"false", true, false},
		{"1", false, true},
		{"true", false, true},
	} {
		t.Run("HANGAR_REQUIRE_TOOLS="+tt.env, func(t *testing.T) {
			t.Setenv(RequireToolsEnv, tt.env)
			r := &recorder{TB: t}
			ToolMissing(r, "%s is not installed", "frobnicate")
			if (r.skipped != "") != tt.skip || (r.failed != "") != tt.fail {
				t.Fatalf("skipped %q, failed %q; want skip %v, fail %v", r.skipped, r.failed, tt.skip, tt.fail)
			}
			if tt.skip && r.skipped != "frobnicate is not installed" {
				t.Errorf("skip message %q", r.skipped)
			}
		})
	}
}

func TestNeedTool(t *testing.T) {
	t.Setenv(RequireToolsEnv, "1")
	r := &recorder{TB: t}
	if path := NeedTool(r, "sh", "the shell"); path == "" || r.failed != "" || r.skipped != "" {
		t.Errorf("NeedTool(sh) = %q, failed %q, skipped %q", path, r.failed, r.skipped)
	}
	r = &recorder{TB: t}
	NeedTool(r, "hangar-no-such-tool", "a tool nobody has")
	if r.failed == "" {
		t.Error("NeedTool of a missing tool under HANGAR_REQUIRE_TOOLS=1 did not fail")
	}
}
