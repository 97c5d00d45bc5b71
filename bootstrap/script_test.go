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
