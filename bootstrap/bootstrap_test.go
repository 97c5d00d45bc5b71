package bootstrap

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeBackend knows one instance, "i1", with token "good-token", whose
// current lease "l-1" has run 1 under way.
type fakeBackend struct {
	ready   []Ready
	current string
	run     int
	rotate  bool
	cache   string
	wait    time.Duration
	hb      []Heartbeat

	mu       sync.Mutex
	output   bytes.Buffer
	exited   bool
	exitCode int
	enrolls  []Enrollment
}

func (f *fakeBackend) OpenOutput(ctx context.Context, instance, lease string, run int) (io.Writer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if instance != "i1" || lease != "l-1" || run != 1 || f.exited {
		return nil, ErrNotCurrent
	}
	return fakeOutput{f}, nil
}

type fakeOutput struct{ f *fakeBackend }

func (o fakeOutput) Write(p []byte) (int, error) {
	o.f.mu.Lock()
	defer o.f.mu.Unlock()
	if o.f.exited {
		return 0, ErrNotCurrent
	}
	return o.f.output.Write(p)
}

func (f *fakeBackend) Exit(ctx context.Context, instance, lease string, run, code int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if instance != "i1" || lease != "l-1" || run != 1 || f.exited && f.exitCode != code {
		return ErrNotCurrent
	}
	f.exited, f.exitCode = true, code
	return nil
}

// The fake's batch token is "batch-token", of pool "p1"; Enroll answers by
// instance id (see fakeEnroll).
func (f *fakeBackend) AuthenticateBatch(hash string) (string, error) {
	if hash == HashToken("batch-token") {
		return "p1", nil
	}
	return "", ErrUnauthorized
}

// Instance ids the fake's Enroll knows: it issues a token to the first, asks
// to wait for the second, refuses the third and fails on the fourth.
const (
	idEnrolls = "i-0123456789abcdef0"
	idPending = "i-00000000"
	idRefused = "i-11111111"
	idBroken  = "i-22222222"
	// issuedToken has a quote, so that the answer's quoting shows.
	issuedToken = "issued'token"
)

func (f *fakeBackend) Enroll(ctx context.Context, hash string, e Enrollment) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if hash != HashToken("batch-token") {
		return "", ErrUnauthorized
	}
	f.enrolls = append(f.enrolls, e)
	switch e.InstanceID {
	case idEnrolls:
		return issuedToken, nil
	case idPending:
		return "", ErrEnrollPending
	case idRefused:
		return "", fmt.Errorf("%w: reused_id", ErrUnauthorized)
	default:
		return "", errors.New("store is down")
	}
}

func (f *fakeBackend) PoolScript(ctx context.Context, pool string) ([]byte, error) {
	return []byte("#!/bin/bash\necho script of " + pool + "\n"), nil
}

func (f *fakeBackend) outputString() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.output.String()
}

func (f *fakeBackend) Authenticate(hash string) (string, error) {
	if hash == HashToken("good-token") {
		return "i1", nil
	}
	return "", ErrUnauthorized
}

func (f *fakeBackend) Script(ctx context.Context, instance string) ([]byte, error) {
	return []byte("#!/bin/bash\necho hi\n"), nil
}

func (f *fakeBackend) Ready(ctx context.Context, instance string, r Ready) error {
	f.ready = append(f.ready, r)
	return nil
}

func (f *fakeBackend) Assignment(ctx context.Context, instance string, p Poll) (Assignment, error) {
	f.current, f.wait, f.run, f.rotate, f.cache = p.Current, p.Wait, p.Run, p.Rotate, p.Cache
	return Assignment{State: AssignAssigned, LeaseID: "l-1", WorkerName: "w1", WorkerPassword: "p'w; $(rm -rf /)", WorkerMaster: "m:1", WorkerCommand: "run-worker"}, nil
}

func (f *fakeBackend) Heartbeat(ctx context.Context, instance string, hb Heartbeat) error {
	f.hb = append(f.hb, hb)
	return nil
}

func TestEndpoints(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(Handler(f, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	do := func(method, path, token, form string) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(form))
		if form != "" {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	key := "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ7 root@host"
	cases := []struct {
		name, method, path, token, form string
		status                          int
		body                            string
	}{
		{"no token", "GET", "/bootstrap/v1/script", "", "", 401, "missing bootstrap token"},
		{"wrong token", "GET", "/bootstrap/v1/script", "bad-token", "", 401, "unknown or revoked"},
		{"script", "GET", "/bootstrap/v1/script", "good-token", "", 200, "echo hi"},
		{"ready", "POST", "/bootstrap/v1/ready", "good-token", "hostname=h1&ssh_host_key=" + url.QueryEscape(key+"\n"), 204, ""},
		{"ready with junk key", "POST", "/bootstrap/v1/ready", "good-token", "ssh_host_key=hello", 400, "not an OpenSSH public key"},
		{"ready huge", "POST", "/bootstrap/v1/ready", "good-token", "ssh_host_key=" + strings.Repeat("a", 20000), 400, "bad ready report"},
		{"assignment bad wait", "GET", "/bootstrap/v1/assignment?wait=forever", "good-token", "", 400, "bad wait"},
		{"heartbeat bad worker", "POST", "/bootstrap/v1/heartbeat", "good-token", "worker=dancing", 400, "worker must be"},
		{"heartbeat bad exit", "POST", "/bootstrap/v1/heartbeat", "good-token", "worker=exited&exit_code=x", 400, "exit_code"},
		{"heartbeat", "POST", "/bootstrap/v1/heartbeat", "good-token", "lease=l-1&worker=exited&exit_code=3", 204, ""},
		{"wrong method", "GET", "/bootstrap/v1/ready", "good-token", "", 405, ""},
	}
	for _, c := range cases {
		status, body := do(c.method, c.path, c.token, c.form)
		if status != c.status || !strings.Contains(body, c.body) {
			t.Errorf("%s: %d %q; want %d containing %q", c.name, status, body, c.status, c.body)
		}
	}
	if len(f.ready) != 1 || f.ready[0].SSHHostKey != key || f.ready[0].Hostname != "h1" {
		t.Errorf("ready reports = %+v", f.ready)
	}
	if len(f.hb) != 1 || f.hb[0] != (Heartbeat{LeaseID: "l-1", Worker: "exited", ExitCode: 3}) {
		t.Errorf("heartbeats = %+v", f.hb)
	}

	// The assignment is shell assignments; hostile values stay literal, and
	// the wait is capped.
	if status, _ := do("GET", "/bootstrap/v1/assignment?rotate=yes", "good-token", ""); status != 400 {
		t.Errorf("assignment with rotate=yes: %d, want 400", status)
	}
	if status, _ := do("GET", "/bootstrap/v1/assignment?rotate=1", "good-token", ""); status != 200 || !f.rotate || f.cache != "" {
		t.Errorf("assignment with rotate=1: %d, rotate %v, cache %q; want 200, true, none", status, f.rotate, f.cache)
	}
	if status, body := do("GET", "/bootstrap/v1/assignment?cache=frozen", "good-token", ""); status != 400 || !strings.Contains(body, "bad cache") {
		t.Errorf("assignment with cache=frozen: %d %q, want 400 bad cache", status, body)
	}
	for _, c := range []string{CacheSynced, CacheSaved} {
		if status, _ := do("GET", "/bootstrap/v1/assignment?cache="+c, "good-token", ""); status != 200 || f.cache != c {
			t.Errorf("assignment with cache=%s: %d, cache %q; want 200, %[1]s", c, status, f.cache)
		}
	}
	status, body := do("GET", "/bootstrap/v1/assignment?wait=1h&current=l-0", "good-token", "")
	if status != 200 || f.current != "l-0" || f.wait != MaxWait || f.rotate {
		t.Fatalf("assignment: %d, current %q, wait %s, rotate %v", status, f.current, f.wait, f.rotate)
	}
	want := `HANGAR_ASSIGNMENT='assigned'
HANGAR_LEASE_ID='l-1'
HANGAR_WORKER_NAME='w1'
HANGAR_WORKER_PASSWORD='p'\''w; $(rm -rf /)'
HANGAR_WORKER_MASTER='m:1'
HANGAR_WORKER_COMMAND='run-worker'
HANGAR_CLEANUP_COMMAND=''
`
	if body != want {
		t.Errorf("assignment body:\n%s\nwant:\n%s", body, want)
	}
}

// TestPollCarriesHeartbeat: a poll with worker= is the instance's heartbeat
// too, checked as strictly as one; a poll without it is no heartbeat.
func TestPollCarriesHeartbeat(t *testing.T) {
	for _, c := range []struct {
		name, query string
		status      int
		body        string
		want        []Heartbeat
	}{
		{"no heartbeat", "current=l-1&run=0", 200, "HANGAR_ASSIGNMENT", nil},
		{"worker running", "current=l-1&run=0&worker=running", 200, "HANGAR_ASSIGNMENT", []Heartbeat{{LeaseID: "l-1", Worker: "running"}}},
		{"worker exited", "current=l-1&run=0&worker=exited&exit_code=3", 200, "", []Heartbeat{{LeaseID: "l-1", Worker: "exited", ExitCode: 3}}},
		{"run exited", "current=l-1&run=2&worker=none&run_exit_code=130", 200, "", []Heartbeat{{LeaseID: "l-1", Worker: "none", RunID: 2, RunExitCode: 130}}},
		{"idle", "current=&run=0&worker=none", 200, "", []Heartbeat{{Worker: "none"}}},
		{"bad worker", "current=l-1&worker=dancing", 400, "worker must be", nil},
		{"bad exit", "current=l-1&worker=exited&exit_code=x", 400, "exit_code", nil},
		{"run exit without a run", "current=l-1&run=0&worker=none&run_exit_code=1", 400, "run must be a run number", nil},
		{"bad run exit", "current=l-1&run=1&worker=none&run_exit_code=256", 400, "run_exit_code must be", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeBackend{}
			srv := httptest.NewServer(Handler(f, slog.New(slog.DiscardHandler)))
			defer srv.Close()
			req, _ := http.NewRequest("GET", srv.URL+"/bootstrap/v1/assignment?wait=0s&"+c.query, nil)
			req.Header.Set("Authorization", "Bearer good-token")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = resp.Body.Close() }()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != c.status || !strings.Contains(string(b), c.body) {
				t.Errorf("%d %q; want %d containing %q", resp.StatusCode, b, c.status, c.body)
			}
			if !slices.Equal(f.hb, c.want) {
				t.Errorf("heartbeats %+v, want %+v", f.hb, c.want)
			}
		})
	}
}
