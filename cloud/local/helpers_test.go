package local

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

const waitFor = 30 * time.Second

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// newTestProvider opens a local cloud (in a fresh temp dir unless opts.Dir
// is set) and, at cleanup, terminates every instance in that dir and checks
// that none of their processes survived.
func newTestProvider(t *testing.T, opts Options) *Provider {
	t.Helper()
	return newTestProviderClock(t, opts, time.Now)
}

func newTestProviderClock(t *testing.T, opts Options, now func() time.Time) *Provider {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	p, err := newProvider(t.Context(), opts, now)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		terminateAll(t, p)
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

func terminateAll(t *testing.T, p *Provider) {
	t.Helper()
	ctx := context.Background()
	insts, err := p.List(ctx, nil)
	if err != nil {
		t.Errorf("cleanup: List: %v", err)
		return
	}
	var ids []string
	for _, in := range insts {
		ids = append(ids, in.ID)
	}
	if _, err := p.Terminate(ctx, ids); err != nil {
		t.Errorf("cleanup: Terminate: %v", err)
	}
	for _, id := range ids {
		if pids := markedProcs(t, id); len(pids) > 0 {
			t.Errorf("cleanup: processes %v of %s survived Terminate", pids, id)
		}
	}
}

// markedProcs scans /proc on its own (not with the code under test) for
// living processes that carry the instance's environment marker.
func markedProcs(t *testing.T, id string) []int {
	t.Helper()
	return scanProcs(t, func(pid int, st procStat, env []string) bool {
		for _, kv := range env {
			if kv == envMarker+"="+id {
				return true
			}
		}
		return false
	})
}

func scanProcs(t *testing.T, match func(pid int, st procStat, env []string) bool) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("reading /proc: %v", err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil || st.state == 'Z' || st.state == 'X' {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/environ")
		if match(pid, st, strings.Split(string(bytes.TrimRight(b, "\x00")), "\x00")) {
			out = append(out, pid)
		}
	}
	return out
}

func launchSpec(userData string, tags map[string]string) cloud.LaunchSpec {
	return cloud.LaunchSpec{
		Image:       "local",
		UserData:    []byte(userData),
		Tags:        tags,
		ClientToken: "test-" + randHex(8),
	}
}

func launchOne(t *testing.T, p *Provider, userData string) cloud.Instance {
	t.Helper()
	insts, err := p.Launch(t.Context(), launchSpec(userData, map[string]string{"test": t.Name()}), 1)
	if err != nil {
		t.Fatalf("Launch: %v", err)
	}
	return insts[0]
}

func get(t *testing.T, p *Provider, id string) cloud.Instance {
	t.Helper()
	insts, err := p.List(t.Context(), nil)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	for _, in := range insts {
		if in.ID == id {
			return in
		}
	}
	t.Fatalf("List lacks %s", id)
	return cloud.Instance{}
}

func waitState(t *testing.T, p *Provider, id string, want cloud.State) cloud.Instance {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		in := get(t, p, id)
		if in.State == want {
			return in
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is %s after %s, want %s", id, in.State, waitFor, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitConsole waits until the console of id contains want and returns it.
func waitConsole(t *testing.T, p *Provider, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		out, err := p.ConsoleOutput(t.Context(), id)
		if err != nil {
			t.Fatalf("ConsoleOutput: %v", err)
		}
		if strings.Contains(string(out), want) {
			return string(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("console of %s lacks %q after %s:\n%s", id, want, waitFor, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
