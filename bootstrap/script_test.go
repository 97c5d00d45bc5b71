package bootstrap

import (
	"github.com/hangar-ci/hangar/internal/testutil"

	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestScriptSources(t *testing.T) {
	var fetches atomic.Int32
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		switch r.URL.Path {
		case "/ok.sh":
			_, _ = w.Write([]byte("#!/bin/bash\necho remote\n"))
		case "/big.sh":
			_, _ = w.Write([]byte(strings.Repeat("#", MaxScript+1)))
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	file := filepath.Join(t.TempDir(), "boot.sh")
	if err := os.WriteFile(file, []byte("#!/bin/bash\necho file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	clock := testutil.NewFakeClock()
	s := &Scripts{HTTP: srv.Client(), CacheFor: time.Hour, Clock: clock}
	ctx := context.Background()

	cases := []struct{ src, want, err string }{
		{"builtin:generic.sh", "hangar-bootstrap", ""},
		{"builtin:nope.sh", "", "no such built-in script"},
		{file, "echo file", ""},
		{filepath.Join(t.TempDir(), "missing.sh"), "", "no such file"},
		{srv.URL + "/ok.sh", "echo remote", ""},
		{srv.URL + "/missing.sh", "", "404"},
		{srv.URL + "/big.sh", "", "over 1048576 bytes"},
	}
	for _, c := range cases {
		got, err := s.Load(ctx, c.src)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Load(%s) error = %v, want %q", c.src, err, c.err)
			}
			continue
		}
		if err != nil || !strings.Contains(string(got), c.want) {
			t.Errorf("Load(%s) = %q, %v; want %q", c.src, got, err, c.want)
		}
	}
	before := fetches.Load()
	for i := 0; i < 5; i++ {
		if _, err := s.Load(ctx, srv.URL+"/ok.sh"); err != nil {
			t.Fatalf("Load(ok.sh) again: %v", err)
		}
	}
	if fetches.Load() != before {
		t.Errorf("cached script fetched %d more times", fetches.Load()-before)
	}
	// The cache follows the clock it is given.
	clock.Advance(time.Hour)
	if _, err := s.Load(ctx, srv.URL+"/ok.sh"); err != nil {
		t.Fatalf("Load(ok.sh) after CacheFor: %v", err)
	}
	if fetches.Load() != before+1 {
		t.Errorf("after CacheFor, fetched %d more times, want 1", fetches.Load()-before)
	}
}

// A bootstrap file is served with its includes expanded, read again at
// every load: a file that includes builtin:generic.sh gets the protocol,
// which reports ready.
func TestScriptFileIncludes(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "ci", "boot.sh")
	for path, body := range map[string]string{
		file:                                  "#!/bin/bash\n# hangar:include lib.sh\n# hangar:include builtin:generic.sh\n",
		filepath.Join(dir, "ci", "lib.sh"):    "#!/bin/bash\necho lib v1\n",
		filepath.Join(dir, "ci", "broken.sh"): "#!/bin/bash\n# hangar:include gone.sh\n",
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := &Scripts{}
	got, err := s.Load(context.Background(), file)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"echo lib v1\n", "/bootstrap/v1/ready"} {
		if !strings.Contains(string(got), want) {
			t.Errorf("served %s has no %q", file, want)
		}
	}
	if strings.Contains(string(got), "# hangar:include") {
		t.Errorf("served %s still has an include line", file)
	}
	if err := os.WriteFile(filepath.Join(dir, "ci", "lib.sh"), []byte("echo lib v2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Load(context.Background(), file); err != nil || !strings.Contains(string(got), "echo lib v2\n") {
		t.Errorf("after an edit of the included file: %v; served:\n%s", err, got)
	}
	_, err = s.Load(context.Background(), filepath.Join(dir, "ci", "broken.sh"))
	if want := "broken.sh:2: including gone.sh: open "; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("a missing include: error %v, want %q", err, want)
	}
}
