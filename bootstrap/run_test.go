package bootstrap

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// The output upload is authenticated, bound to the instance's current run,
// streamed (chunked, any length) and closed by the exit report; bad input is
// refused with the reason.
func TestRunEndpoints(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(Handler(f, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	do := func(method, path, token string, body io.Reader) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, body)
		if method == "POST" {
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
	// More than the 16 KiB a form may have, sent in chunks of unknown length.
	big := strings.Repeat("0123456789abcdef", 4096) + "end\n"
	pr, pw := io.Pipe()
	go func() {
		for i := 0; i < len(big); i += 1000 {
			_, _ = pw.Write([]byte(big[i:min(i+1000, len(big))]))
		}
		_ = pw.Close()
	}()
	if status, body := do("PUT", "/bootstrap/v1/output?lease=l-1&run=1", "good-token", pr); status != 204 {
		t.Fatalf("streamed upload: %d %s", status, body)
	}
	if got := f.outputString(); got != big {
		t.Fatalf("output has %d bytes, want the %d sent", len(got), len(big))
	}

	cases := []struct {
		name, method, path, token, body string
		status                          int
		msg                             string
	}{
		{"output without token", "PUT", "/bootstrap/v1/output?lease=l-1&run=1", "", "x", 401, "missing bootstrap token"},
		{"output with a wrong token", "PUT", "/bootstrap/v1/output?lease=l-1&run=1", "bad-token", "x", 401, "unknown or revoked"},
		{"output to another lease", "PUT", "/bootstrap/v1/output?lease=l-2&run=1", "good-token", "x", 409, "not a run under way on this instance's current lease"},
		{"output to another run", "PUT", "/bootstrap/v1/output?lease=l-1&run=2", "good-token", "x", 409, "not a run under way"},
		{"output without lease", "PUT", "/bootstrap/v1/output?run=1", "good-token", "x", 400, "lease is required"},
		{"output with a bad run", "PUT", "/bootstrap/v1/output?lease=l-1&run=first", "good-token", "x", 400, `run must be a run number, not "first"`},
		{"output by POST", "POST", "/bootstrap/v1/output?lease=l-1&run=1", "good-token", "x", 405, ""},
		{"exit without token", "POST", "/bootstrap/v1/exit", "", "lease=l-1&run=1&exit_code=0", 401, "missing bootstrap token"},
		{"exit of another lease", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-2&run=1&exit_code=0", 409, "not a run under way"},
		{"exit status too big", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-1&run=1&exit_code=256", 400, `exit_code must be a number from 0 to 255, not "256"`},
		{"exit status missing", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-1&run=1", 400, "exit_code must be a number"},
		{"exit without run", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-1&exit_code=0", 400, "run must be a run number"},
		{"exit", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-1&run=1&exit_code=3", 204, ""},
		{"the same exit again", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-1&run=1&exit_code=3", 204, ""},
		{"another exit status", "POST", "/bootstrap/v1/exit", "good-token", "lease=l-1&run=1&exit_code=0", 409, "not a run under way"},
		{"output after exit", "PUT", "/bootstrap/v1/output?lease=l-1&run=1", "good-token", "late", 409, "not a run under way"},
		{"heartbeat with a bad run", "POST", "/bootstrap/v1/heartbeat", "good-token", "lease=l-1&worker=none&run=0&run_exit_code=1", 400, "run must be a run number"},
		{"heartbeat with a bad run status", "POST", "/bootstrap/v1/heartbeat", "good-token", "lease=l-1&worker=none&run=1&run_exit_code=-1", 400, "run_exit_code must be a number from 0 to 255"},
		{"heartbeat with a run", "POST", "/bootstrap/v1/heartbeat", "good-token", "lease=l-1&worker=none&run=1&run_exit_code=3", 204, ""},
		{"assignment with a bad run", "GET", "/bootstrap/v1/assignment?current=l-1&run=-1", "good-token", "", 400, "bad run"},
	}
	for _, c := range cases {
		status, body := do(c.method, c.path, c.token, strings.NewReader(c.body))
		if status != c.status || !strings.Contains(body, c.msg) {
			t.Errorf("%s: %d %q; want %d containing %q", c.name, status, body, c.status, c.msg)
		}
	}
	if got := f.outputString(); got != big {
		t.Errorf("refused uploads changed the output (%d bytes)", len(got))
	}
	if n := len(f.hb); n != 1 || f.hb[0].RunID != 1 || f.hb[0].RunExitCode != 3 {
		t.Errorf("heartbeats = %+v", f.hb)
	}

	// run= tells a bootstrap that takes runs from one that does not.
	for _, c := range []struct {
		query string
		want  int
	}{{"current=l-1", -1}, {"current=l-1&run=0", 0}, {"current=l-1&run=2", 2}} {
		if status, _ := do("GET", "/bootstrap/v1/assignment?"+c.query, "good-token", nil); status != 200 || f.run != c.want {
			t.Errorf("assignment?%s: %d, run %d; want 200, run %d", c.query, status, f.run, c.want)
		}
	}
}

// An upload that breaks off leaves a marker where bytes may be missing.
func TestRunOutputBrokenUpload(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(Handler(f, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	_, _ = fmt.Fprintf(conn, "PUT /bootstrap/v1/output?lease=l-1&run=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good-token\r\nTransfer-Encoding: chunked\r\n\r\n")
	_, _ = fmt.Fprintf(conn, "6\r\nhello\n\r\n")
	// The handler has the first chunk once it is in the output.
	for deadline := time.Now().Add(10 * time.Second); f.outputString() != "hello\n"; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("first chunk never arrived: %q", f.outputString())
		}
	}
	_, _ = fmt.Fprintf(conn, "10\r\nwor") // a chunk cut short: what came is kept
	_ = conn.Close()
	want := "hello\nwor" + BrokenMarker
	for deadline := time.Now().Add(10 * time.Second); f.outputString() != want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("output = %q, want %q", f.outputString(), want)
		}
	}
}

// An assignment with a run carries its number and command; one without
// reads as it always has.
func TestAssignmentShellRun(t *testing.T) {
	a := Assignment{State: AssignAssigned, LeaseID: "l-1", RunID: 2, RunCommand: `'echo' '$(id)'`}
	want := `HANGAR_ASSIGNMENT='assigned'
HANGAR_LEASE_ID='l-1'
HANGAR_WORKER_NAME=''
HANGAR_WORKER_PASSWORD=''
HANGAR_WORKER_MASTER=''
HANGAR_WORKER_COMMAND=''
HANGAR_RUN_ID='2'
HANGAR_RUN_COMMAND=''\''echo'\'' '\''$(id)'\'''
HANGAR_CLEANUP_COMMAND=''
`
	if got := a.Shell(); got != want {
		t.Errorf("Shell() =\n%s\nwant\n%s", got, want)
	}
}

// A rotated token and a worker user are written only when set, and the
// user only where the bootstrap reads it (assigned and released answers).
func TestAssignmentShellTokenAndUser(t *testing.T) {
	tests := []struct {
		a    Assignment
		want string
	}{
		{Assignment{State: AssignReleased, CleanupCommand: "rm -rf /tmp/x"},
			"HANGAR_ASSIGNMENT='released'\nHANGAR_CLEANUP_COMMAND='rm -rf /tmp/x'\n"},
		{Assignment{State: AssignReleased, NewToken: "tok_new-1", WorkerUser: "build", CleanupCommand: "c"},
			"HANGAR_ASSIGNMENT='released'\nHANGAR_NEW_TOKEN='tok_new-1'\nHANGAR_WORKER_USER='build'\nHANGAR_CLEANUP_COMMAND='c'\n"},
		{Assignment{State: AssignAssigned, LeaseID: "l-1", WorkerUser: "it's"},
			"HANGAR_ASSIGNMENT='assigned'\nHANGAR_WORKER_USER='it'\\''s'\nHANGAR_LEASE_ID='l-1'\nHANGAR_WORKER_NAME=''\n" +
				"HANGAR_WORKER_PASSWORD=''\nHANGAR_WORKER_MASTER=''\nHANGAR_WORKER_COMMAND=''\nHANGAR_CLEANUP_COMMAND=''\n"},
		{Assignment{State: AssignNone, NewToken: "tok_x", WorkerUser: "build"},
			"HANGAR_ASSIGNMENT='none'\nHANGAR_NEW_TOKEN='tok_x'\nHANGAR_CLEANUP_COMMAND=''\n"},
		{Assignment{State: AssignTerminate, WorkerUser: "build"},
			"HANGAR_ASSIGNMENT='terminate'\nHANGAR_CLEANUP_COMMAND=''\n"},
	}
	for _, tt := range tests {
		if got := tt.a.Shell(); got != tt.want {
			t.Errorf("%+v: Shell() =\n%s\nwant\n%s", tt.a, got, tt.want)
		}
	}
}
