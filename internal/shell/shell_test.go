package shell

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/hangar-ci/hangar/internal/testutil"
)

func TestValidName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"demo", true},
		{"0pool", true},
		{"a.b_c-d", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{"", false},
		{"-demo", false},
		{".demo", false},
		{"Demo", false},
		{"de mo", false},
		{"demo\n", false},
		{"dé", false},
	}
	for _, tt := range tests {
		if err := ValidName(tt.name); (err == nil) != tt.ok {
			t.Errorf("ValidName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestValidEnvName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"FOO", true},
		{"_foo9", true},
		{"HANGAR", true},
		{"HANGARX", true},
		{"", false},
		{"9FOO", false},
		{"FOO-BAR", false},
		{"FOO BAR", false},
		{"HANGAR_", false},
		{"HANGAR_WORKER_PASSWORD", false},
		{"BASH_ENV", false},
		{"ENV", false},
		{"LD_PRELOAD", false},
		{"LD_AUDIT", false},
		{"LD_LIBRARY_PATH", true},
	}
	for _, tt := range tests {
		if err := ValidEnvName(tt.name); (err == nil) != tt.ok {
			t.Errorf("ValidEnvName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestQuote(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", `''`},
		{"abc", `'abc'`},
		{"it's", `'it'\''s'`},
		{"'", `''\'''`},
		{"$(x) `y` \"z\" \\", "'$(x) `y` \"z\" \\'"},
	}
	for _, tt := range tests {
		if got := Quote(tt.in); got != tt.want {
			t.Errorf("Quote(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

func TestUnquote(t *testing.T) {
	for _, s := range []string{"", "abc", "it's", "'", "''", "$(x) `y` \"z\" \\", "a\nb"} {
		if got, ok := Unquote(Quote(s)); !ok || got != s {
			t.Errorf("Unquote(Quote(%q)) = %q, %v", s, got, ok)
		}
	}
	for _, word := range []string{"", "'", "abc", "'abc", "abc'", "'it's'", `"abc"`, "'a' 'b'"} {
		if got, ok := Unquote(word); ok {
			t.Errorf("Unquote(%s) = %q: a word Quote never writes", word, got)
		}
	}
}

func FuzzQuote(f *testing.F) {
	bash := testutil.NeedTool(f, "bash", "runs the quoted strings")
	for _, v := range []string{"'; touch pwned #", "$(touch pwned)", "`touch pwned`", "a\nb", "\x01\xff", "ünï ✓"} {
		f.Add(v)
	}
	f.Add("'")
	f.Add("''''")
	f.Add("-n")
	f.Add("%s %d \\n")
	f.Add("!event ~user *glob ?")
	f.Fuzz(func(t *testing.T, s string) {
		if strings.ContainsRune(s, 0) {
			t.Skip("no argument can hold a NUL byte")
		}
		cmd := exec.Command(bash, "-c", "printf %s "+Quote(s))
		cmd.Dir = t.TempDir() // where a quoting bug's "touch pwned" would land
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C"}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("bash -c printf %%s %s: %v", Quote(s), err)
		}
		if string(out) != s {
			t.Errorf("round trip of %q gave %q", s, out)
		}
	})
}
