package run

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// chunk is one answer of the fake's output endpoint: an HTTP error status,
// or data, and the exit status once done.
type chunk struct {
	status int
	data   string
	exit   int // -1: still running
}

// fakeAPI is the part of Hangar's lease API that Run uses, scripted: one
// lease, "l-1", on instance "i-1".
type fakeAPI struct {
	t       *testing.T
	mu      sync.Mutex
	pending bool    // the lease never becomes active
	chunks  []chunk // the output endpoint's answers, in order
	state   pool.LeaseState
	leased  []api.LeaseRequest
	runs    [][]string
	release []string // "l-1 discard=…"
	calls   int
}

func (f *fakeAPI) view() pool.LeaseView {
	return pool.LeaseView{ID: "l-1", Pool: "demo", State: f.state, Instance: &pool.LeaseInstance{ID: "i-1", PrivateIP: "127.0.0.2"},
		ExpiresAt: time.Now().Add(time.Hour), Run: &pool.RunView{ID: len(f.runs) + 1}}
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	answer := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(v) // a failed write is a client gone (interrupted)
	}
	switch {
	case r.Method == "POST" && r.URL.Path == "/v1/leases":
		var req api.LeaseRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			f.t.Errorf("decoding the lease request: %v", err)
		}
		if req.Pool != "demo" {
			answer(404, api.Error{Code: "not_found", Message: fmt.Sprintf("unknown pool %q", req.Pool)})
			return
		}
		f.leased = append(f.leased, req)
		f.state = pool.LeaseActive
		if f.pending {
			f.state = pool.LeasePending
		}
		answer(201, f.view())
	case r.Method == "GET" && r.URL.Path == "/v1/leases/l-1":
		time.Sleep(5 * time.Millisecond)
		answer(200, f.view())
	case r.Method == "POST" && r.URL.Path == "/v1/leases/l-1/runs":
		var req api.RunRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			f.t.Errorf("decoding the run request: %v", err)
		}
		f.runs = append(f.runs, req.Command)
		f.state = pool.LeaseActive
		answer(201, f.view())
	case r.Method == "POST" && r.URL.Path == "/v1/leases/l-1/renew":
		answer(200, f.view())
	case r.Method == "DELETE" && r.URL.Path == "/v1/leases/l-1":
		f.release = append(f.release, "l-1 discard="+r.URL.Query().Get("discard"))
		f.state = pool.LeaseReleased
		w.WriteHeader(http.StatusNoContent)
	case r.Method == "GET" && r.URL.Path == "/v1/leases/l-1/output":
		if len(f.chunks) == 0 {
			f.t.Errorf("output asked for after the last chunk")
			answer(500, api.Error{Code: "internal", Message: "no more output"})
			return
		}
		c := f.chunks[0]
		f.chunks = f.chunks[1:]
		if c.status != 0 {
			answer(c.status, api.Error{Code: "scripted", Message: "scripted " + strconv.Itoa(c.status)})
			return
		}
		offset, _ := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		h := w.Header()
		h.Set(api.HeaderRun, "1")
		h.Set(api.HeaderEpoch, "e1")
		h.Set(api.HeaderOffset, strconv.FormatInt(offset, 10))
		h.Set(api.HeaderNext, strconv.FormatInt(offset+int64(len(c.data)), 10))
		h.Set(api.HeaderRunState, string(pool.RunRunning))
		if c.exit >= 0 {
			h.Set(api.HeaderRunState, string(pool.RunExited))
			h.Set(api.HeaderExitCode, strconv.Itoa(c.exit))
		}
		_, _ = w.Write([]byte(c.data)) // a failed write is a client gone
	default:
		f.t.Errorf("unexpected %s %s", r.Method, r.URL)
		answer(404, api.Error{Code: "not_found", Message: "no such endpoint"})
	}
}

func startFake(t *testing.T, f *fakeAPI) *api.Client {
	f.t = t
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return &api.Client{BaseURL: srv.URL}
}

func runFake(t *testing.T, c *api.Client, o Options) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut strings.Builder
	code = Run(context.Background(), c, o, &out, &errOut)
	return code, out.String(), errOut.String()
}

// Run streams the output, retries an answer the next try may not have (a
// 5xx: a server restarting), exits with the command's status and releases
// the lease, discarding the instance only when asked to on failure.
func TestRunExitStatus(t *testing.T) {
	for _, discard := range []bool{false, true} {
		t.Run(fmt.Sprintf("discard-on-failure=%t", discard), func(t *testing.T) {
			f := &fakeAPI{chunks: []chunk{{data: "hel", exit: -1}, {status: 503}, {data: "lo\n", exit: 3}}}
			code, stdout, stderr := runFake(t, startFake(t, f), Options{Pool: "demo", Command: []string{"make", "a b"}, Wait: time.Minute, TTL: 90 * time.Second, DiscardOnFailure: discard})
			if code != 3 || stdout != "hello\n" {
				t.Errorf("exit %d, stdout %q; stderr:\n%s", code, stdout, stderr)
			}
			if want := fmt.Sprintf("l-1 discard=%t", discard); len(f.release) != 1 || f.release[0] != want {
				t.Errorf("releases %v, want [%s]", f.release, want)
			}
			if len(f.leased) != 1 || strings.Join(f.leased[0].Command, "|") != "make|a b" || f.leased[0].TTL != "1m30s" || !strings.HasPrefix(f.leased[0].ClientToken, "run-") {
				t.Errorf("lease requests %+v", f.leased)
			}
			if !strings.Contains(stderr, "running on i-1 (127.0.0.2) for lease l-1") || !strings.Contains(stderr, "exited with status 3; lease l-1 released") {
				t.Errorf("stderr:\n%s", stderr)
			}
		})
	}
}

// Quiet leaves only the command's output.
func TestRunQuiet(t *testing.T) {
	f := &fakeAPI{chunks: []chunk{{data: "ok\n", exit: 0}}}
	code, stdout, stderr := runFake(t, startFake(t, f), Options{Pool: "demo", Command: []string{"true"}, Quiet: true})
	if code != 0 || stdout != "ok\n" || stderr != "" {
		t.Errorf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// No instance within Wait: the lease is canceled and Run exits 75.
func TestRunNoInstanceWithinWait(t *testing.T) {
	f := &fakeAPI{pending: true}
	code, stdout, stderr := runFake(t, startFake(t, f), Options{Pool: "demo", Command: []string{"true"}, Wait: 100 * time.Millisecond})
	if code != ExitNoInstance || stdout != "" || !strings.Contains(stderr, "no instance of pool demo within 100ms; lease l-1 canceled") {
		t.Errorf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if len(f.release) != 1 || f.release[0] != "l-1 discard=false" {
		t.Errorf("releases %v", f.release)
	}
}

// A lease that ends under the command (409 on its output) exits 125 and
// says what became of it.
func TestRunLeaseLost(t *testing.T) {
	f := &fakeAPI{t: t, chunks: []chunk{{data: "x", exit: -1}, {status: 409}}}
	srv := httptest.NewServer(&expireOn409{f})
	defer srv.Close()
	code, _, stderr := runFake(t, &api.Client{BaseURL: srv.URL}, Options{Pool: "demo", Command: []string{"sleep", "9"}})
	if code != ExitHangar || !strings.Contains(stderr, "lease l-1 is expired: the command's instance is gone or no longer yours") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
	if len(f.release) != 0 {
		t.Errorf("an expired lease was released: %v", f.release)
	}
}

// expireOn409 expires the lease when the output answers 409, as the
// server does for a lease that ended under its run.
type expireOn409 struct{ *fakeAPI }

func (e *expireOn409) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	if r.URL.Path == "/v1/leases/l-1/output" && len(e.chunks) > 0 && e.chunks[0].status == 409 {
		e.state = pool.LeaseExpired
	}
	e.mu.Unlock()
	e.fakeAPI.ServeHTTP(w, r)
}

// With Lease, the command runs on the caller's lease, which stays theirs.
func TestRunOnHeldLease(t *testing.T) {
	f := &fakeAPI{chunks: []chunk{{data: "done\n", exit: 4}}}
	code, stdout, _ := runFake(t, startFake(t, f), Options{Lease: "l-1", Command: []string{"sh", "-c", "exit 4"}})
	if code != 4 || stdout != "done\n" || len(f.runs) != 1 || len(f.release) != 0 || len(f.leased) != 0 {
		t.Errorf("exit %d, stdout %q, runs %v, releases %v, leases %v", code, stdout, f.runs, f.release, f.leased)
	}
}

// Options Run cannot use, a request Hangar refuses and a server that does
// not answer all exit 125 and say why.
func TestRunHangarFailure(t *testing.T) {
	f := &fakeAPI{}
	c := startFake(t, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := &api.Client{BaseURL: "http://" + ln.Addr().String()}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		c    *api.Client
		o    Options
		msg  string
	}{
		{"neither pool nor lease", c, Options{Command: []string{"true"}}, "a pool to lease from, or a lease to run on, is required"},
		{"pool and lease", c, Options{Pool: "demo", Lease: "l-1", Command: []string{"true"}}, "not both"},
		{"no command", c, Options{Pool: "demo"}, "no command"},
		{"discard with lease", c, Options{Lease: "l-1", Command: []string{"true"}, DiscardOnFailure: true}, "--discard-on-failure needs hangar run to lease"},
		{"negative wait", c, Options{Pool: "demo", Command: []string{"true"}, Wait: -1}, "must not be negative"},
		{"unknown pool", c, Options{Pool: "nope", Command: []string{"true"}, Quiet: true}, `asking for an instance of pool nope: unknown pool "nope"`},
		{"server gone", gone, Options{Pool: "demo", Command: []string{"true"}}, "asking for an instance of pool demo: cannot reach Hangar at"},
	}
	for _, tc := range cases {
		code, stdout, stderr := runFake(t, tc.c, tc.o)
		if code != ExitHangar || stdout != "" || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d and %q", tc.name, code, stdout, stderr, ExitHangar, tc.msg)
		}
	}
	if f.calls != 1 { // only the unknown pool's
		t.Errorf("%d calls to Hangar, want 1", f.calls)
	}
}
