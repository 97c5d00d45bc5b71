package scripts

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/hangar-ci/hangar/internal/shell"
)

// runServer is a bootstrap endpoint for runs. assign answers the n-th
// assignment poll; output answers an upload with a status of its own when
// it returns one.
type runServer struct {
	t      *testing.T
	assign func(n int, current, run string) string
	output func() int
	onExit func(lease, run, code string)

	mu         sync.Mutex
	polls      []string // "current run"
	heartbeats []string
	uploads    int
	out        strings.Builder
	exits      []string // "lease run code output-length"
}

func (s *runServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+testToken {
		http.Error(w, "unknown token", http.StatusUnauthorized)
		return
	}
	switch {
	case r.Method == http.MethodPut && r.URL.Path == "/bootstrap/v1/output":
		s.mu.Lock()
		s.uploads++
		s.mu.Unlock()
		if s.output != nil && s.output() != 0 {
			http.Error(w, "no", s.output())
			return
		}
		if q := r.URL.Query(); q.Get("lease") != "lease-1" || q.Get("run") != "1" {
			http.Error(w, "wrong run", http.StatusConflict)
			return
		}
		b, err := io.ReadAll(r.Body)
		s.mu.Lock()
		s.out.Write(b)
		s.mu.Unlock()
		if err != nil {
			s.t.Errorf("reading the upload: %v", err)
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f := r.Form.Get
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/bootstrap/v1/ready":
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodPost && r.URL.Path == "/bootstrap/v1/exit":
		if s.onExit != nil {
			s.onExit(f("lease"), f("run"), f("exit_code"))
		}
		s.mu.Lock()
		s.exits = append(s.exits, strings.Join([]string{f("lease"), f("run"), f("exit_code"), strconv.Itoa(s.out.Len())}, " "))
		s.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodGet && r.URL.Path == "/bootstrap/v1/assignment":
		s.mu.Lock()
		if r.Form.Has("worker") { // the poll is the heartbeat too
			exited := ""
			if r.Form.Has("run_exit_code") {
				exited = f("run")
			}
			s.heartbeats = append(s.heartbeats, strings.TrimSpace(f("current")+" "+f("worker")+" "+exited+" "+f("run_exit_code")))
		}
		s.polls = append(s.polls, f("current")+" "+f("run"))
		n := len(s.polls)
		s.mu.Unlock()
		_, _ = io.WriteString(w, s.assign(n, f("current"), f("run")))
	default:
		http.NotFound(w, r)
	}
}

func (s *runServer) saw(list *[]string, want string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range *list {
		if x == want {
			return true
		}
	}
	return false
}

// killPid ends a process a test left behind, if the pid file held one.
func killPid(s string) {
	if pid, err := strconv.Atoi(s); err == nil && pid > 1 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// shellCommand quotes argv the way Hangar does for HANGAR_RUN_COMMAND.
func shellCommand(argv ...string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = shell.Quote(a)
	}
	return strings.Join(q, " ")
}

// A lease made for a run: the command runs instead of a worker, without
// the token; its merged output is uploaded whole before its status is
// reported; what it left running is ended; its status is repeated in a
// heartbeat. A second run on the same lease is stopped, group and all, by
// the release.
func TestGenericRun(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string { return filepath.Join(dir, name) }
	run1 := shellCommand("sh", "-c", `for i in 1 2 3; do echo "out $i"; echo "err $i" >&2; done
env > "$0/run1.env"
sleep 600 & echo $! > "$0/leftover.pid"
exit 3`, dir)
	run2 := shellCommand("bash", "-c", `echo $$ > "$0.tmp" && mv "$0.tmp" "$0"; sleep 600`, file("run2.pid"))

	var leftoverAlive bool
	srv := &runServer{t: t}
	srv.onExit = func(lease, run, code string) {
		if run == "1" {
			leftoverAlive = processAlive(readPid(t, file("leftover.pid")))
		}
	}
	var run2Left, run2GroupLeft bool
	srv.assign = func(n int, current, run string) string {
		switch {
		case n == 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1", "HANGAR_WORKER_NAME", "w1",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "", "HANGAR_WORKER_COMMAND", "",
				"HANGAR_RUN_ID", "1", "HANGAR_RUN_COMMAND", run1)
		case n > 200:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		case current == "lease-1" && run == "1" && srv.saw(&srv.heartbeats, "lease-1 none 1 3"):
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1", "HANGAR_WORKER_NAME", "w1",
				"HANGAR_WORKER_PASSWORD", testPassword, "HANGAR_WORKER_MASTER", "", "HANGAR_WORKER_COMMAND", "",
				"HANGAR_RUN_ID", "2", "HANGAR_RUN_COMMAND", run2)
		case current == "lease-1" && run == "2":
			waitForFile(t, file("run2.pid"))
			return answer("HANGAR_ASSIGNMENT", "released")
		case current == "" && run == "0" && n > 2:
			pid := readPid(t, file("run2.pid"))
			_, pgrp, _ := procStat(pid)
			run2Left, run2GroupLeft = processAlive(pid), pgrp > 0 && groupAlive(t, pgrp)
			return answer("HANGAR_ASSIGNMENT", "terminate")
		default:
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	t.Cleanup(func() {
		for _, f := range []string{"leftover.pid", "run2.pid"} {
			if b, err := os.ReadFile(file(f)); err == nil {
				killPid(strings.TrimSpace(string(b)))
			}
		}
	})

	out, code := runGeneric(t, dir, hs)
	t.Logf("bootstrap output:\n%s", out)
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	want := "out 1\nerr 1\nout 2\nerr 2\nout 3\nerr 3\n"
	if got := srv.out.String(); got != want {
		t.Errorf("uploaded output %q, want %q", got, want)
	}
	if len(srv.exits) != 1 || srv.exits[0] != "lease-1 1 3 "+strconv.Itoa(len(want)) {
		t.Errorf("exit reports %q, want one for run 1, status 3, after all %d bytes", srv.exits, len(want))
	}
	if leftoverAlive {
		t.Error("what the command left running outlived it")
	}
	if run2Left || run2GroupLeft {
		t.Errorf("after release: run 2 alive %v, its group alive %v", run2Left, run2GroupLeft)
	}
	for _, want := range []string{" 0", "lease-1 1", "lease-1 2", " 0"} {
		found := false
		for _, p := range srv.polls {
			found = found || p == want
		}
		if !found {
			t.Errorf("no poll with current and run %q among %q", want, srv.polls)
		}
	}
	for _, want := range []string{
		"hangar-bootstrap: run 1 of lease lease-1 started",
		"hangar-bootstrap: run 1 of lease lease-1 exited with status 3",
		"hangar-bootstrap: run 2 of lease lease-1 started",
		"hangar-bootstrap: run 2 of lease lease-1 stopped",
		"hangar-bootstrap: lease lease-1 released",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("bootstrap output lacks %q", want)
		}
	}
	if strings.Contains(out, "worker started") {
		t.Error("a worker started for a run")
	}
	env := readEnvLines(t, file("run1.env"))
	for k, v := range map[string]string{"HANGAR_LEASE_ID": "lease-1", "HANGAR_RUN_ID": "1", "POOL_ENV": "pool value"} {
		if env[k] != v {
			t.Errorf("command env %s=%q, want %q", k, env[k], v)
		}
	}
	for _, k := range []string{"HANGAR_BOOTSTRAP_TOKEN", "HANGAR_RUN_COMMAND", "HANGAR_ASSIGNMENT"} {
		if _, ok := env[k]; ok {
			t.Errorf("command env has %s", k)
		}
	}
	if left, _ := filepath.Glob(file("hangar-*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %q", left)
	}
}

// When Hangar refuses the output, the command still runs to its end (its
// writes do not fail) and its status is reported.
func TestGenericRunOutputRefused(t *testing.T) {
	dir := t.TempDir()
	srv := &runServer{t: t, output: func() int { return http.StatusConflict }}
	command := shellCommand("sh", "-c", `head -c 1000000 /dev/zero; echo done > "$0/finished"`, dir)
	srv.assign = func(n int, current, run string) string {
		switch {
		case n == 1:
			return answer("HANGAR_ASSIGNMENT", "assigned", "HANGAR_LEASE_ID", "lease-1", "HANGAR_RUN_ID", "1", "HANGAR_RUN_COMMAND", command)
		case srv.saw(&srv.exits, "lease-1 1 0 0") || n > 200:
			return answer("HANGAR_ASSIGNMENT", "terminate")
		default:
			return answer("HANGAR_ASSIGNMENT", "none")
		}
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	out, _ := runGeneric(t, dir, hs)
	if _, err := os.Stat(filepath.Join(dir, "finished")); err != nil {
		t.Errorf("the command did not finish: %v\n%s", err, out)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if len(srv.exits) != 1 || srv.exits[0] != "lease-1 1 0 0" || srv.uploads != 1 {
		t.Errorf("exits %q after %d uploads; want status 0 after one refused upload\n%s", srv.exits, srv.uploads, out)
	}
	if !strings.Contains(out, "Hangar refused the output of run 1 of lease lease-1 (HTTP 409); dropping the rest") {
		t.Errorf("output lacks the refusal:\n%s", out)
	}
}

func readEnvLines(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the command did not run: %v", err)
	}
	env := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		k, v, _ := strings.Cut(line, "=")
		env[k] = v
	}
	return env
}
