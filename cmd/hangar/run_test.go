package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cirun "github.com/hangar-ci/hangar/ci/run"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

var (
	leaseInNote    = regexp.MustCompile(`lease (l-[A-Za-z0-9_-]+)`)
	instanceInNote = regexp.MustCompile(`running on (i-[0-9a-f]+)`)
)

// find returns the first match of re's group in s, or fails.
func find(t *testing.T, re *regexp.Regexp, s string) string {
	t.Helper()
	m := re.FindStringSubmatch(s)
	if m == nil {
		t.Fatalf("no %s in %q", re, s)
	}
	return m[1]
}

// noLeases checks that a pool has nothing leased or queued.
func noLeases(t *testing.T, ts *testServer) {
	t.Helper()
	pools, err := ts.client.Pools(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pools {
		if p.LeasesActive != 0 || p.LeasesPending != 0 {
			t.Errorf("pool %s has %d leases active and %d pending after hangar run", p.Name, p.LeasesActive, p.LeasesPending)
		}
	}
}

// hangar run streams the command's merged output in order, exits with its
// status, passes every argument literally, and releases its lease.
func TestRun(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	srv := "--server=" + ts.url
	sentinel := filepath.Join(t.TempDir(), "pwned")
	hostile := []string{"'; touch " + sentinel + " #", "$(touch " + sentinel + ")", "`touch " + sentinel + "`", `"$HOME" \`, "", "a  b", "tab\there", "new\nline", "ünï ✓"}
	var order strings.Builder
	for i := 1; i <= 200; i++ {
		order.WriteString("out " + strconv.Itoa(i) + "\nerr " + strconv.Itoa(i) + "\n")
	}
	cases := []struct {
		name     string
		flags    []string
		argv     []string
		code     int
		stdout   string
		stderrRE string
	}{
		{"order of stdout and stderr", nil, []string{"sh", "-c", `for i in $(seq 1 200); do echo "out $i"; echo "err $i" >&2; done`}, 0, order.String(),
			`^(hangar: waiting for an instance of pool demo \(lease l-\S+\)\n)?hangar: running on i-[0-9a-f]+ \(127\.[0-9.]+\) for lease l-\S+\nhangar: the command exited with status 0; lease l-\S+ released\n$`},
		{"exit status", nil, []string{"sh", "-c", "echo before; exit 3"}, 3, "before\n", `the command exited with status 3; lease l-\S+ released\n$`},
		{"killed by a signal", nil, []string{"sh", "-c", "echo before; kill -TERM $$"}, 143, "before\n", `status 143`},
		{"no such command", []string{"-q"}, []string{"no-such-command-hangar"}, 127, "", `^$`},
		{"hostile arguments arrive as they are", []string{"-q"}, append([]string{"printf", `[%s]\n`}, hostile...), 0,
			"[" + strings.Join(hostile, "]\n[") + "]\n", `^$`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append(append(append([]string{srv, "run", "demo"}, c.flags...), "--"), c.argv...)
			code, stdout, stderr := runCLI(t, args...)
			if code != c.code {
				t.Errorf("exit status %d, want %d; stderr:\n%s", code, c.code, stderr)
			}
			switch {
			case c.code == 127:
				if !strings.Contains(stdout, "exec: no-such-command-hangar: not found") {
					t.Errorf("stdout %q lacks the shell's complaint", stdout)
				}
			case stdout != c.stdout:
				t.Errorf("stdout %q, want %q", stdout, c.stdout)
			}
			if !regexp.MustCompile(c.stderrRE).MatchString(stderr) {
				t.Errorf("stderr %q does not match %s", stderr, c.stderrRE)
			}
			noLeases(t, ts)
		})
	}
	if _, err := os.Stat(sentinel); err == nil {
		t.Error("a hostile argument ran as shell code")
	}
}

// Binary output of several MiB arrives whole and unchanged.
func TestRunLargeOutput(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	data := make([]byte, 5<<20)
	rand.Read(data)
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runCLI(t, "--server="+ts.url, "run", "-q", "demo", "--", "cat", path)
	if code != 0 || stdout != string(data) {
		t.Errorf("exit %d, %d bytes of output (want the %d written); stderr: %s", code, len(stdout), len(data), stderr)
	}
}

// --discard-on-failure terminates the instance of a failed command; a
// successful one, or a failure without the flag, gives it back for reuse.
func TestRunDiscardOnFailure(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	cases := []struct {
		name    string
		flags   []string
		status  string
		discard bool
	}{
		{"failure with the flag", []string{"--discard-on-failure"}, "exit 1", true},
		{"success with the flag", []string{"--discard-on-failure"}, "exit 0", false},
		{"failure without the flag", nil, "exit 1", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append(append([]string{"--server=" + ts.url, "run", "demo"}, c.flags...), "--", "sh", "-c", c.status)
			_, _, stderr := runCLI(t, args...)
			id := find(t, instanceInNote, stderr)
			if c.discard {
				if !strings.Contains(stderr, "its instance discarded") {
					t.Errorf("stderr does not say the instance was discarded: %s", stderr)
				}
				waitGone(t, ts, id)
				return
			}
			testutil.Eventually(t, id+" to be idle again", 30*time.Second, func() bool {
				for _, in := range ts.instances(t, "demo") {
					if in.ID == id {
						return in.State == pool.Idle
					}
				}
				return false
			})
		})
	}
}

// Ctrl-C or SIGTERM to hangar run releases the lease, discards the instance
// and so ends the command on it; hangar run exits with 128+signal.
func TestRunInterrupted(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	bin := hangarBinary(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(cirun.SignalNames[sig], func(t *testing.T) {
			pidFile := filepath.Join(t.TempDir(), "remote.pid")
			cmd := exec.Command(bin, "--server="+ts.url, "run", "demo", "--", "sh", "-c", `echo $$ > "$0"; echo started; exec sleep 600`, pidFile)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { _ = cmd.Process.Kill() }() // gone already, unless the test failed
			line, err := bufio.NewReader(stdout).ReadString('\n')
			if err != nil || line != "started\n" {
				t.Fatalf("first output %q, %v; stderr: %s", line, err, stderr.String())
			}
			remote, err := strconv.Atoi(strings.TrimSpace(readFile(t, pidFile)))
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			err = cmd.Wait()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 128+int(sig) {
				t.Errorf("hangar run ended with %v, want exit status %d", err, 128+int(sig))
			}
			note := stderr.String()
			if !strings.Contains(note, "interrupted by "+cirun.SignalNames[sig]) || !strings.Contains(note, "released, its instance discarded") {
				t.Errorf("stderr: %s", note)
			}
			leaseID, id := find(t, leaseInNote, note), find(t, instanceInNote, note)
			if v, err := ts.client.GetLease(context.Background(), leaseID, 0); err != nil || v.State != pool.LeaseReleased {
				t.Errorf("lease after the interrupt: %+v, %v; want released", v, err)
			}
			waitGone(t, ts, id)
			if syscall.Kill(remote, 0) == nil {
				t.Errorf("the remote command (pid %d) outlived the interrupt", remote)
			}
		})
	}
}

// With no instance to be had within --wait, hangar run says so, cancels its
// lease and exits 75.
func TestRunNoInstance(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1"), nil)
	ts.lease(t, api.LeaseRequest{Pool: "demo"})
	code, stdout, stderr := runCLI(t, "--server="+ts.url, "run", "--wait", "1s", "demo", "--", "true")
	if code != exitNoInstance || stdout != "" || !regexp.MustCompile(`no instance of pool demo within 1s; lease l-\S+ canceled\n$`).MatchString(stderr) {
		t.Errorf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	id := find(t, leaseInNote, stderr)
	if v, err := ts.client.GetLease(context.Background(), id, 0); err != nil || v.State != pool.LeaseCanceled {
		t.Errorf("lease %s after giving up: %+v, %v; want canceled", id, v, err)
	}
}

// hangar run --lease runs commands one after the other on a lease the
// caller holds (a GitLab job's stages), which stays the caller's.
func TestRunOnLease(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	l := ts.lease(t, api.LeaseRequest{Pool: "demo"})
	srv := "--server=" + ts.url
	steps := []struct {
		argv   []string
		code   int
		stdout string
	}{
		{[]string{"sh", "-c", `echo "$HANGAR_LEASE_ID $HANGAR_RUN_ID" > shared.txt; echo written`}, 0, "written\n"},
		{[]string{"cat", "shared.txt"}, 0, l.ID + " 1\n"},
		{[]string{"sh", "-c", "echo $HANGAR_RUN_ID; exit 4"}, 4, "3\n"},
	}
	for i, s := range steps {
		code, stdout, stderr := runCLI(t, append([]string{srv, "run", "-q", "--lease", l.ID, "--"}, s.argv...)...)
		if code != s.code || stdout != s.stdout || stderr != "" {
			t.Errorf("step %d: exit %d, stdout %q, stderr %q; want %d, %q", i+1, code, stdout, stderr, s.code, s.stdout)
		}
	}
	if v, err := ts.client.GetLease(context.Background(), l.ID, 0); err != nil || v.State != pool.LeaseActive || v.Run == nil || v.Run.ID != 3 {
		t.Errorf("lease after its runs: %+v, %v; want still active, run 3", v, err)
	}
	// The pool's worker kept running beside the runs.
	if env := ts.workerEnv(t, l.Instance.ID); env["HANGAR_LEASE_ID"] != l.ID {
		t.Errorf("worker env = %v", env)
	}
}

// Usage mistakes and refused requests end with 125 and say why.
func TestRunUsage(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	srv := "--server=" + ts.url
	cases := []struct {
		name string
		args []string
		msg  string
	}{
		{"no --", []string{"run", "demo", "true"}, "put -- before the command"},
		{"no command", []string{"run", "demo", "--"}, "no command after --"},
		{"no pool", []string{"run", "--", "true"}, "usage: hangar run POOL"},
		{"pool and --lease", []string{"run", "--lease", "l-x", "demo", "--", "true"}, "usage: hangar run POOL"},
		{"discard with --lease", []string{"run", "--lease", "l-x", "--discard-on-failure", "--", "true"}, "--discard-on-failure needs hangar run to lease"},
		{"unknown flag", []string{"run", "--colour", "demo", "--", "true"}, "unknown flag: --colour"},
		{"unknown pool", []string{"run", "nope", "--", "true"}, `asking for an instance of pool nope: unknown pool "nope"`},
		{"NUL in an argument", []string{"run", "demo", "--", "echo", "a\x00b"}, "command[1] holds a NUL byte"},
		{"unknown lease", []string{"run", "--lease", "l-nope", "--", "true"}, `starting the command on lease l-nope: unknown lease "l-nope"`},
	}
	for _, c := range cases {
		code, stdout, stderr := runCLI(t, append([]string{srv}, c.args...)...)
		if code != exitHangar || stdout != "" || !strings.Contains(stderr, c.msg) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d and %q", c.name, code, stdout, stderr, exitHangar, c.msg)
		}
	}
	noLeases(t, ts)
}

// GET /v1/leases/{id}/output answers with the output as its body and where
// it stands in headers, and refuses what it cannot answer.
func TestRunOutputAPI(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	ctx := context.Background()
	plain := ts.lease(t, api.LeaseRequest{Pool: "demo"})
	v := ts.lease(t, api.LeaseRequest{Pool: "demo", Command: []string{"sh", "-c", "echo hello; exit 5"}})
	if v.Run == nil || v.Run.ID != 1 {
		t.Fatalf("lease with a command: run %+v", v.Run)
	}
	var out bytes.Buffer
	var last pool.RunOutput
	var offset int64
	for epoch := ""; !last.Done; {
		var err error
		last, err = ts.client.Output(ctx, v.ID, 0, offset, epoch, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		out.Write(last.Data)
		offset, epoch = last.Next, last.Epoch
	}
	if out.String() != "hello\n" || last.ExitCode != 5 || last.State != pool.RunExited || last.Run != 1 {
		t.Errorf("output %q, last answer %+v", out.String(), last)
	}

	// The same by hand: the body is the output.
	resp, err := http.Get(ts.url + "/v1/leases/" + v.ID + "/output?offset=0")
	if err != nil {
		t.Fatal(err)
	}
	body := new(bytes.Buffer)
	_, err = body.ReadFrom(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	h := resp.Header
	if resp.StatusCode != 200 || body.String() != "hello\n" || h.Get("Hangar-Output-Next") != "6" || h.Get("Hangar-Exit-Code") != "5" || h.Get("Hangar-Run-State") != "exited" {
		t.Errorf("GET output: %d %q %v", resp.StatusCode, body, h)
	}

	if _, err := ts.client.StartRun(ctx, v.ID, []string{"sleep", "600"}); err != nil {
		t.Errorf("a second run after the first exited: %v", err)
	}
	ended := ts.lease(t, api.LeaseRequest{Pool: "demo", Command: []string{"true"}})
	if err := ts.client.Release(ctx, ended.ID, false); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, method, path, body string
		status                   int
		code, msg                string
	}{
		{"lease without a command", "GET", "/v1/leases/" + plain.ID + "/output", "", 400, "bad_request", "has no command"},
		{"unknown lease", "GET", "/v1/leases/l-nope/output", "", 404, "not_found", `unknown lease "l-nope"`},
		{"bad offset", "GET", "/v1/leases/" + v.ID + "/output?offset=-1", "", 400, "bad_request", `offset: "-1" is not a byte offset`},
		{"offset past the end", "GET", "/v1/leases/" + v.ID + "/output?offset=99", "", 400, "bad_request", "past the end"},
		{"bad run", "GET", "/v1/leases/" + v.ID + "/output?run=x", "", 400, "bad_request", `run: "x" is not a run number`},
		{"replaced run", "GET", "/v1/leases/" + v.ID + "/output?run=1", "", 400, "bad_request", "only the output of its latest run (2) is kept"},
		{"bad wait", "GET", "/v1/leases/" + v.ID + "/output?wait=later", "", 400, "bad_request", "wait"},
		{"ended lease", "GET", "/v1/leases/" + ended.ID + "/output", "", 409, "conflict", "is released; the output of its command is no longer kept"},
		{"run while one runs", "POST", "/v1/leases/" + v.ID + "/runs", `{"command":["true"]}`, 409, "conflict", "run 2 of " + v.ID + " has not exited yet"},
		{"run without command", "POST", "/v1/leases/" + plain.ID + "/runs", `{"command":[]}`, 400, "bad_request", "command is required"},
		{"run on an ended lease", "POST", "/v1/leases/" + ended.ID + "/runs", `{"command":["true"]}`, 409, "conflict", "is released"},
		{"lease with an empty program", "POST", "/v1/leases", `{"pool":"demo","command":[""]}`, 400, "bad_request", "command[0], the program to run, must not be empty"},
	}
	for _, c := range cases {
		status, e := call(t, ts.url, c.method, c.path, c.body, "")
		if status != c.status || e.Code != c.code || !strings.Contains(e.Message, c.msg) {
			t.Errorf("%s: %s %s = %d %+v; want %d %s containing %q", c.name, c.method, c.path, status, e, c.status, c.code, c.msg)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	var b []byte
	testutil.Eventually(t, path+" to be written", 30*time.Second, func() bool {
		var err error
		b, err = os.ReadFile(path)
		return err == nil && len(b) > 0
	})
	return string(b)
}

// brokenPipe is a stdout whose reader has gone, as in `hangar run … | head -1`.
type brokenPipe struct{ n int }

func (b *brokenPipe) Write(p []byte) (int, error) {
	if b.n++; b.n > 1 {
		return 0, syscall.EPIPE
	}
	return len(p), nil
}

// A reader of the output that goes away ends the run like a signal would:
// the lease is released and its instance discarded.
func TestRunStdoutGone(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	var stderr strings.Builder
	code := run([]string{"--server=" + ts.url, "run", "demo", "--", "sh", "-c", "while :; do echo more; sleep 0.05; done"}, &brokenPipe{}, &stderr)
	if code != 128+int(syscall.SIGPIPE) || !strings.Contains(stderr.String(), "writing the command's output: broken pipe; lease") {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
	waitGone(t, ts, find(t, instanceInNote, stderr.String()))
	noLeases(t, ts)
}
