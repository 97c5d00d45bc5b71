package scripts

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/shell"
	"github.com/hangar-ci/hangar/internal/testutil"
)

const (
	testToken    = "tok_bootstrap-0123456789"
	testPassword = "pw-Very-Secret-42"
)

// protocolServer is a minimal Hangar bootstrap endpoint. assign answers the
// n-th (from 1) assignment poll with the lines it returns.
type protocolServer struct {
	t      *testing.T
	assign func(n int, current string) string
	// ready and assignment answer with these statuses when not 0.
	readyStatus, assignmentStatus func(n int) int
	// script is what GET /bootstrap/v1/script serves.
	script []byte

	mu         sync.Mutex
	token      string // the token accepted: testToken until rotate
	calls      []string
	refused    []string // calls with another token: "METHOD PATH token"
	readyForm  map[string][]string
	polls      []string // the current= of each poll
	heartbeats []string // "lease worker exit_code"
	readies    int
	output     map[string]*strings.Builder // by "lease run"
	exits      []string                    // "lease run exit_code"
	pid        int                         // of the bash running the script
}

// rotate makes the server accept token, and only token, from now on, as
// Hangar does from the moment it builds a released answer with a new one;
// it returns the answer's line.
func (s *protocolServer) rotate(token string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.token = token
	return "HANGAR_NEW_TOKEN=" + shell.Quote(token) + "\n"
}

// callsWith returns how many calls carried token.
func (s *protocolServer) callsWith(token string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		if strings.HasSuffix(c, " "+token) {
			n++
		}
	}
	return n
}

func (s *protocolServer) bootstrapPid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pid
}

func (s *protocolServer) runOutput(lease, run string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.output[lease+" "+run]; b != nil {
		return b.String()
	}
	return ""
}

func (s *protocolServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	want := s.token
	if want == "" {
		want = testToken
	}
	got, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.calls = append(s.calls, r.Method+" "+r.URL.Path+" "+got)
	if got != want {
		s.refused = append(s.refused, r.Method+" "+r.URL.Path+" "+got)
	}
	s.mu.Unlock()
	if got != want {
		http.Error(w, "unknown token", http.StatusUnauthorized)
		return
	}
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/bootstrap/v1/script" && s.script != nil:
		_, _ = w.Write(s.script)
		return
	case r.Method == http.MethodPut && r.URL.Path == "/bootstrap/v1/output":
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		if s.output == nil {
			s.output = map[string]*strings.Builder{}
		}
		k := r.URL.Query().Get("lease") + " " + r.URL.Query().Get("run")
		if s.output[k] == nil {
			s.output[k] = &strings.Builder{}
		}
		s.output[k].Write(b)
		s.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/bootstrap/v1/ready":
		s.mu.Lock()
		s.readies++
		n := s.readies
		s.readyForm = r.PostForm
		s.mu.Unlock()
		if s.readyStatus != nil && s.readyStatus(n) != 0 {
			http.Error(w, "no", s.readyStatus(n))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodPost && r.URL.Path == "/bootstrap/v1/exit":
		f := r.PostForm.Get
		s.mu.Lock()
		s.exits = append(s.exits, f("lease")+" "+f("run")+" "+f("exit_code"))
		s.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodGet && r.URL.Path == "/bootstrap/v1/assignment":
		if got := r.URL.Query().Get("wait"); got != "50s" {
			s.t.Errorf("assignment poll with wait=%q, want 50s", got)
		}
		if got := r.URL.Query().Get("rotate"); got != "1" {
			s.t.Errorf("assignment poll with rotate=%q, want 1: generic.sh takes rotated tokens", got)
		}
		q := r.URL.Query()
		current := q.Get("current")
		s.mu.Lock()
		if q.Has("worker") { // the poll is the heartbeat too
			s.heartbeats = append(s.heartbeats, strings.TrimSpace(current+" "+q.Get("worker")+" "+q.Get("exit_code")))
		}
		s.polls = append(s.polls, current)
		n := len(s.polls)
		s.mu.Unlock()
		if s.assignmentStatus != nil && s.assignmentStatus(n) != 0 {
			http.Error(w, "no", s.assignmentStatus(n))
			return
		}
		_, _ = fmt.Fprint(w, s.assign(n, current))
	default:
		http.NotFound(w, r)
	}
}

func (s *protocolServer) sawHeartbeat(want string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, hb := range s.heartbeats {
		if hb == want {
			return true
		}
	}
	return false
}

// answer renders an assignment answer the way the server must: NAME='value'
// lines quoted with shell.Quote, "export " before lease env.
func answer(vars ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(vars); i += 2 {
		fmt.Fprintf(&b, "%s=%s\n", vars[i], shell.Quote(vars[i+1]))
	}
	return b.String()
}

// runGeneric runs generic.sh against srv with a clean environment and
// returns its output and exit code.
func runGeneric(t *testing.T, dir string, srv *httptest.Server) (string, int) {
	t.Helper()
	script := filepath.Join(dir, "generic.sh")
	b, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(script, b, 0o700); err != nil {
		t.Fatal(err)
	}
	return runBootstrap(t, dir, srv, []string{"HANGAR_BOOTSTRAP_TOKEN=" + testToken}, script)
}

// runBootstrap runs bash with args in dir, with the environment the
// user-data gives generic.sh (plus env, with the token), as the user-data
// does, and returns its output and exit code. It tells srv, when it is a
// protocolServer, the bash's pid.
func runBootstrap(t *testing.T, dir string, srv *httptest.Server, env []string, args ...string) (string, int) {
	t.Helper()
	return runBootstrapAs(t, nil, dir, srv, env, args...)
}

// runBootstrapAs is runBootstrap as the user of cred (nil: this one).
func runBootstrapAs(t *testing.T, cred *syscall.Credential, dir string, srv *httptest.Server, env []string, args ...string) (string, int) {
	t.Helper()
	key := filepath.Join(dir, "ssh_host_ed25519_key.pub")
	if err := os.WriteFile(key, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest root@test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	outPath := filepath.Join(dir, "output")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = out.Close() }()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", args...)
	cmd.Dir = dir
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + dir,
		"TMPDIR=" + dir,
		// The token file goes to dir/var/lib/hangar.
		"HANGAR_ROOT=" + dir,
		"HANGAR_URL=" + srv.URL,
		"HANGAR_POOL=demo",
		"POOL_ENV=pool value",
		"HANGAR_SSH_HOST_KEY_FILE=" + key,
	}, env...)
	// The output goes to a file, not a pipe a stray worker could hold open.
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if ps, ok := srv.Config.Handler.(*protocolServer); ok {
		ps.mu.Lock()
		ps.pid = cmd.Process.Pid
		ps.mu.Unlock()
	}
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	err = cmd.Wait()
	output, _ := os.ReadFile(outPath)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(output), 0
	case errors.As(err, &exit):
		return string(output), exit.ExitCode()
	default:
		t.Fatalf("running %q: %v\n%s", args, err, output)
		return "", 0
	}
}

// A lease runs a worker, is released (worker and children gone, cleanup run,
// next poll clean), a second worker exits by itself and is reported, then
// Hangar terminates the instance.
func TestGenericLeaseCycle(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }
	q := shell.Quote
	// The trap reaps the sleep, which otherwise could linger as a zombie
	// where PID 1 does not reap orphans (containers).
	worker1 := "echo $$ > " + q(file("worker.pid")) + "; sleep 600 & child=$!; trap 'wait $child; exit 143' TERM; " +
		"echo $child > " + q(file("child.pid")) + "; env -0 > " + q(file("env.tmp")) + " && mv " + q(file("env.tmp")) + " " + q(file("worker.env")) + "; wait"

	var groupLeft, childLeft bool
	srv := &protocolServer{t: t}
	srv.assign = func(n int, current string) string {
		switch n {
		case 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1", "HANGAR_WORKER_NAME", "worker-1",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "master.example.com:9989",
				"HANGAR_WORKER_COMMAND", worker1) +
				"export LEASE_ENV=" + q("it's\n$(leased)") + "\n"
		case 2:
			waitForFile(t, file("worker.env"))
			return answer("HANGAR_ASSIGNMENT", "released", "HANGAR_CLEANUP_COMMAND", "touch "+q(file("cleaned")))
		case 3:
			srv.mu.Lock()
			groupLeft = groupAlive(t, readPid(t, file("worker.pid")))
			childLeft = processAlive(readPid(t, file("child.pid")))
			srv.mu.Unlock()
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-2", "HANGAR_WORKER_NAME", "worker-2",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "m:1", "HANGAR_WORKER_COMMAND", "exit 3")
		default:
			if srv.sawHeartbeat("lease-2 exited 3") || n > 20 {
				return answer("HANGAR_ASSIGNMENT", "terminate")
			}
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	t.Cleanup(func() {
		if b, err := os.ReadFile(file("worker.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
		}
	})

	out, code := runGeneric(t, dir, hs)
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	for _, secret := range []string{testPassword, testToken} {
		if strings.Contains(out, secret) {
			t.Errorf("output shows a secret (%s)", secret)
		}
	}
	for _, want := range []string{
		"hangar-bootstrap: reported ready",
		"hangar-bootstrap: worker started for lease lease-1",
		"hangar-bootstrap: lease lease-1 released",
		"hangar-bootstrap: worker started for lease lease-2",
		"hangar-bootstrap: worker for lease lease-2 exited with status 3",
		"hangar-bootstrap: Hangar asked this instance to terminate",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	t.Logf("output:\n%s", out)

	srv.mu.Lock()
	defer srv.mu.Unlock()
	if got := srv.readyForm["hostname"]; len(got) != 1 || got[0] == "" {
		t.Errorf("ready hostname = %q", got)
	}
	if got := srv.readyForm["ssh_host_key"]; len(got) != 1 || !strings.HasPrefix(got[0], "ssh-ed25519 AAAAC3") {
		t.Errorf("ready ssh_host_key = %q", got)
	}
	if len(srv.polls) < 4 || srv.polls[0] != "" || srv.polls[1] != "lease-1" || srv.polls[2] != "" || srv.polls[3] != "lease-2" {
		t.Errorf("polls had current = %q, want \"\", lease-1, \"\", lease-2 …", srv.polls)
	}
	for _, want := range []string{"none", "lease-1 running", "lease-2 exited 3"} {
		found := false
		for _, hb := range srv.heartbeats {
			found = found || hb == want
		}
		if !found {
			t.Errorf("no heartbeat %q among %q", want, srv.heartbeats)
		}
	}
	if groupLeft || childLeft {
		t.Errorf("after release: worker process group alive %v, its child alive %v", groupLeft, childLeft)
	}
	if _, err := os.Stat(file("cleaned")); err != nil {
		t.Errorf("cleanup command did not run: %v", err)
	}

	env := readEnv(t, file("worker.env"))
	for k, v := range map[string]string{
		"HANGAR_LEASE_ID":        "lease-1",
		"HANGAR_WORKER_NAME":     "worker-1",
		"HANGAR_WORKER_PASSWORD": testPassword,
		"HANGAR_WORKER_MASTER":   "master.example.com:9989",
		"LEASE_ENV":              "it's\n$(leased)",
		"POOL_ENV":               "pool value",
	} {
		if env[k] != v {
			t.Errorf("worker env %s=%q, want %q", k, env[k], v)
		}
	}
	for _, k := range []string{"HANGAR_BOOTSTRAP_TOKEN", "HANGAR_ASSIGNMENT", "HANGAR_WORKER_COMMAND"} {
		if _, ok := env[k]; ok {
			t.Errorf("worker env has %s", k)
		}
	}
	if left, _ := filepath.Glob(file("hangar-assignment.*")); len(left) > 0 {
		t.Errorf("assignment files left behind: %q", left)
	}
}

func TestGenericExits(t *testing.T) {
	terminate := func(int, string) string { return answer("HANGAR_ASSIGNMENT", "terminate") }
	tests := []struct {
		name             string
		readyStatus      func(n int) int
		assignmentStatus func(n int) int
		wantExit         int
		wantOut          string
	}{
		{name: "ready refused", readyStatus: func(int) int { return 401 }, wantExit: 1,
			wantOut: "hangar-bootstrap: Hangar answered HTTP 401 to ready: it no longer knows this instance; stopping"},
		{name: "ready retried after 503", readyStatus: func(n int) int { return map[int]int{1: 503}[n] },
			wantOut: "hangar-bootstrap: reporting ready failed (HTTP 503); retrying in 1s"},
		{name: "assignment gone", assignmentStatus: func(int) int { return 404 }, wantExit: 1,
			wantOut: "hangar-bootstrap: Hangar answered HTTP 404 to assignment"},
		{name: "assignment retried after 500", assignmentStatus: func(n int) int { return map[int]int{1: 500}[n] },
			wantOut: "hangar-bootstrap: polling for an assignment failed (HTTP 500); retrying in 1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := &protocolServer{t: t, assign: terminate, readyStatus: tt.readyStatus, assignmentStatus: tt.assignmentStatus}
			hs := httptest.NewServer(srv)
			defer hs.Close()
			out, code := runGeneric(t, t.TempDir(), hs)
			if code != tt.wantExit || !strings.Contains(out, tt.wantOut) {
				t.Errorf("exit code %d (want %d), output lacks %q:\n%s", code, tt.wantExit, tt.wantOut, out)
			}
		})
	}
}

func TestGenericShellcheck(t *testing.T) {
	shellcheck := testutil.NeedTool(t, "shellcheck", "apt-get install shellcheck")
	if out, err := exec.Command(shellcheck, filepath.Join("bootstrap", "generic.sh")).CombinedOutput(); err != nil {
		t.Errorf("shellcheck: %v\n%s", err, out)
	}
}

func TestBootstrapScript(t *testing.T) {
	b, err := BootstrapScript("generic.sh")
	if err != nil || !bytes.HasPrefix(b, []byte("#!/bin/bash\n")) {
		t.Errorf("BootstrapScript(generic.sh) = %.20q, %v", b, err)
	}
	if _, err := BootstrapScript("missing.sh"); err == nil {
		t.Error("BootstrapScript(missing.sh) succeeded")
	}
}

func waitForFile(t *testing.T, path string) {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Errorf("%s did not appear", path)
}

func readPid(t *testing.T, path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Errorf("reading pid: %v", err)
		return -1
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Errorf("reading pid: %v", err)
		return -1
	}
	return pid
}

// procStat returns the state and process group of pid, from /proc because
// kill(pid, 0) also succeeds for zombies.
func procStat(pid int) (state string, pgrp int, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, false
	}
	// The fields after the command name, which is in parentheses and may
	// hold spaces: state, ppid, pgrp, …
	i := bytes.LastIndexByte(b, ')')
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 3 {
		return "", 0, false
	}
	pgrp, _ = strconv.Atoi(fields[2])
	return fields[0], pgrp, true
}

func processAlive(pid int) bool {
	state, _, ok := procStat(pid)
	return ok && state != "Z"
}

func groupAlive(t *testing.T, pgid int) bool {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if state, pgrp, ok := procStat(pid); ok && pgrp == pgid && state != "Z" {
			return true
		}
	}
	return false
}

// readEnv parses the output of env -0, which survives any value.
func readEnv(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the worker did not run: %v", err)
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(bytes.TrimSuffix(data, []byte{0}), []byte{0}) {
		k, v, _ := strings.Cut(string(kv), "=")
		env[k] = v
	}
	return env
}
