package staging_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/cloud/staging/sshtest"
	"github.com/hangar-ci/hangar/internal/testutil"
)

// testEnv is a running sshd that trusts a fresh key, whose host key is
// pinned in a fresh known_hosts file.
type testEnv struct {
	srv     *sshtest.Server
	signer  ssh.Signer
	keyPath string
	kh      *staging.KnownHosts
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	srv := sshtest.Start(t)
	signer, pub, keyPath, err := staging.LoadOrCreateKey(filepath.Join(t.TempDir(), "keys"), "test")
	if err != nil {
		t.Fatal(err)
	}
	srv.AuthorizeKey(pub)
	kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
	if err := kh.Pin(srv.Addr(), srv.HostKey()); err != nil {
		t.Fatal(err)
	}
	return &testEnv{srv: srv, signer: signer, keyPath: keyPath, kh: kh}
}

func (e *testEnv) dial(t *testing.T) *staging.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := staging.Dial(ctx, e.srv.Addr(), e.srv.User(), e.signer, e.kh)
	if err != nil {
		t.Fatalf("dialing: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRun(t *testing.T) {
	c := newTestEnv(t).dial(t)
	ctx := testContext(t)

	out, err := c.Output(ctx, "echo hello; whoami >/dev/null")
	if err != nil || string(out) != "hello\n" {
		t.Fatalf("Output = %q, %v; want \"hello\\n\", nil", out, err)
	}

	var stdout, stderr bytes.Buffer
	err = c.Run(ctx, "echo out; echo first >&2; echo 'it failed' >&2; exit 3", nil, &stdout, &stderr)
	var exitErr *staging.ExitError
	if !errors.As(err, &exitErr) {
		t.Fatalf("Run error %v (%T), want *ExitError", err, err)
	}
	if exitErr.Status != 3 || exitErr.Stderr != "first\nit failed\n" || !strings.Contains(exitErr.Command, "exit 3") {
		t.Errorf("ExitError = %+v", exitErr)
	}
	if want := `exited with status 3: first` + "\n" + `it failed`; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not contain %q", err, want)
	}
	if stdout.String() != "out\n" || stderr.String() != "first\nit failed\n" {
		t.Errorf("stdout %q, stderr %q", stdout.String(), stderr.String())
	}
}

func TestRunKeepsStderrTail(t *testing.T) {
	c := newTestEnv(t).dial(t)
	err := c.Run(testContext(t), "head -c 100000 /dev/zero | tr '\\0' x >&2; echo; echo the reason >&2; exit 1", nil, nil, nil)
	var exitErr *staging.ExitError
	if !errors.As(err, &exitErr) {
		t.Fatalf("got %v, want *ExitError", err)
	}
	if len(exitErr.Stderr) > 4096 || !strings.HasSuffix(exitErr.Stderr, "the reason\n") {
		t.Errorf("stderr tail has %d bytes ending %q", len(exitErr.Stderr), exitErr.Stderr[max(0, len(exitErr.Stderr)-20):])
	}
}

func TestRunStdin(t *testing.T) {
	c := newTestEnv(t).dial(t)
	ctx := testContext(t)
	var out bytes.Buffer
	if err := c.Run(ctx, "tr a-z A-Z", strings.NewReader("streamed input\n"), &out, nil); err != nil {
		t.Fatal(err)
	}
	if out.String() != "STREAMED INPUT\n" {
		t.Errorf("got %q", out.String())
	}

	// A command that stops reading early is not an error of ours.
	out.Reset()
	if err := c.Run(ctx, "head -c 3", io.LimitReader(zeroReader{}, 50<<20), &out, nil); err != nil {
		t.Fatalf("command reading part of stdin: %v", err)
	}
	if out.Len() != 3 {
		t.Errorf("got %d bytes", out.Len())
	}
}

func TestRunStdinReadError(t *testing.T) {
	c := newTestEnv(t).dial(t)
	target := filepath.Join(t.TempDir(), "partial")
	broken := errors.New("disk on fire")
	stdin := io.MultiReader(strings.NewReader("some data"), errReader{broken})
	err := c.Run(testContext(t), "cat > "+target+" && echo done > "+target+".done", stdin, nil, nil)
	if !errors.Is(err, broken) || !strings.Contains(err.Error(), "reading input") {
		t.Fatalf("got %v, want the read error", err)
	}
	// The command must have been killed, not given EOF as if input ended.
	time.Sleep(200 * time.Millisecond)
	if _, err := os.Stat(target + ".done"); err == nil {
		t.Error("the command finished as if its input were complete")
	}
}

func TestUploadDownload(t *testing.T) {
	c := newTestEnv(t).dial(t)
	ctx := testContext(t)
	dir := t.TempDir()
	data := make([]byte, 5<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	local := filepath.Join(dir, "local file")
	if err := os.WriteFile(local, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"plain", `it's a "file" with spaces; $(touch pwned) *`} {
		remote := filepath.Join(dir, "remote", name)
		if err := os.MkdirAll(filepath.Dir(remote), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := c.Upload(ctx, local, remote, 0o640); err != nil {
			t.Fatalf("uploading to %q: %v", name, err)
		}
		// sshd runs on this machine, so the remote file can be read here.
		got, err := os.ReadFile(remote)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("uploaded %q differs (%d bytes, want %d)", name, len(got), len(data))
		}
		assertMode(t, remote, 0o640)

		back := filepath.Join(dir, "back "+strconv.Itoa(len(name)))
		if err := c.Download(ctx, remote, back); err != nil {
			t.Fatalf("downloading %q: %v", name, err)
		}
		got, err = os.ReadFile(back)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("downloaded %q differs", name)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "remote"))
	if len(entries) != 2 {
		t.Errorf("remote dir holds %d entries, want 2 (no leftovers, no injected files)", len(entries))
	}
}

func TestUploadDownloadErrors(t *testing.T) {
	c := newTestEnv(t).dial(t)
	ctx := testContext(t)
	dir := t.TempDir()
	local := filepath.Join(dir, "f")
	if err := os.WriteFile(local, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := c.Upload(ctx, local, filepath.Join(dir, "no such dir", "f"), 0o644)
	var exitErr *staging.ExitError
	if !errors.As(err, &exitErr) || !strings.Contains(err.Error(), "uploading "+local) || !strings.Contains(exitErr.Stderr, "No such file") {
		t.Errorf("upload into a missing dir: %v", err)
	}
	err = c.Download(ctx, filepath.Join(dir, "missing"), filepath.Join(dir, "out"))
	if !errors.As(err, &exitErr) || !strings.Contains(err.Error(), "downloading") {
		t.Errorf("download of a missing file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "out")); err == nil {
		t.Error("failed download left a file")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("failed transfers left %d files, want only f", len(entries))
	}
}

func TestDialUnknownHost(t *testing.T) {
	e := newTestEnv(t)
	e.kh = &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "empty_known_hosts")}
	_, err := staging.Dial(testContext(t), e.srv.Addr(), e.srv.User(), e.signer, e.kh)
	if !errors.Is(err, staging.ErrUnknownHost) || !strings.Contains(err.Error(), "ssh handshake with "+e.srv.Addr()) {
		t.Errorf("got %v, want ErrUnknownHost", err)
	}
}

func TestDialChangedHostKey(t *testing.T) {
	e := newTestEnv(t)
	other := sshtest.Start(t)
	// Pin the other server's key for this server's address, as if the
	// server had come back with a new host key.
	e.kh = &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
	if err := e.kh.Pin(e.srv.Addr(), other.HostKey()); err != nil {
		t.Fatal(err)
	}
	_, err := staging.Dial(testContext(t), e.srv.Addr(), e.srv.User(), e.signer, e.kh)
	if !errors.Is(err, staging.ErrHostKeyChanged) || !strings.Contains(err.Error(), "host key changed") {
		t.Errorf("got %v, want ErrHostKeyChanged", err)
	}
}

func TestDialUnreachable(t *testing.T) {
	e := newTestEnv(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	_, err = staging.Dial(testContext(t), addr, e.srv.User(), e.signer, e.kh)
	if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), "connecting to "+addr) {
		t.Errorf("got %v, want connection refused while connecting to %s", err, addr)
	}
}

func TestDialCancelled(t *testing.T) {
	e := newTestEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := staging.Dial(ctx, e.srv.Addr(), e.srv.User(), e.signer, e.kh)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
}

func TestRunCancel(t *testing.T) {
	c := newTestEnv(t).dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.Run(ctx, "sleep 30", nil, nil, nil)
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("Run took %v after cancellation", elapsed)
	}
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), `running "sleep 30"`) {
		t.Errorf("got %v, want DeadlineExceeded", err)
	}
	// The command itself must be gone, not left running on the server
	// (sshd cannot signal a root login's commands, so this needs the
	// process-group kill). sshd runs on this machine, so /proc shows it.
	marker := "sleep 30." + strconv.Itoa(int(time.Now().UnixNano()%1000)+1000)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if err := c.Run(ctx2, marker+"; echo not killed", nil, nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want DeadlineExceeded", err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for processRunning(t, marker) {
		if time.Now().After(deadline) {
			t.Fatalf("%q still runs on the server after cancellation", marker)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// The connection outlives one cancelled command.
	if out, err := c.Output(testContext(t), "echo still here"); err != nil || string(out) != "still here\n" {
		t.Errorf("after cancel: %q, %v", out, err)
	}
}

func TestKnownHostsWorksForOpenSSH(t *testing.T) {
	testutil.NeedTools(t, "apt-get install openssh-client", "ssh", "ssh-keygen")
	e := newTestEnv(t)
	host := "[127.0.0.1]:" + strconv.Itoa(e.srv.Port())
	out, err := exec.Command("ssh-keygen", "-F", host, "-f", e.kh.Path).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Host "+host+" found") {
		t.Errorf("ssh-keygen -F %s: %v\n%s", host, err, out)
	}

	runSSH := func(knownHosts string) ([]byte, error) {
		ctx := testContext(t)
		return exec.CommandContext(ctx, "ssh", "-F", "/dev/null",
			"-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
			"-o", "UserKnownHostsFile="+knownHosts, "-o", "GlobalKnownHostsFile=/dev/null",
			"-o", "StrictHostKeyChecking=yes",
			"-i", e.keyPath, "-p", strconv.Itoa(e.srv.Port()),
			e.srv.User()+"@127.0.0.1", "echo via-openssh").CombinedOutput()
	}
	if out, err := runSSH(e.kh.Path); err != nil || !strings.Contains(string(out), "via-openssh") {
		t.Errorf("ssh with Hangar's known_hosts: %v\n%s", err, out)
	}

	other := sshtest.Start(t)
	wrong := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "wrong_known_hosts")}
	if err := wrong.Pin(e.srv.Addr(), other.HostKey()); err != nil {
		t.Fatal(err)
	}
	if out, err := runSSH(wrong.Path); err == nil || !strings.Contains(string(out), "HOST IDENTIFICATION HAS CHANGED") {
		t.Errorf("ssh with another host's key: %v\n%s", err, out)
	}
}

func fakeTCPAddr(t *testing.T, s string) net.Addr {
	t.Helper()
	addr, err := net.ResolveTCPAddr("tcp", s)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// processRunning tells whether a process runs whose arguments are the words
// of cmdline.
func processRunning(t *testing.T, cmdline string) bool {
	t.Helper()
	want := strings.Join(strings.Fields(cmdline), "\x00") + "\x00"
	dirs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if b, err := os.ReadFile(d); err == nil && string(b) == want {
			return true
		}
	}
	return false
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestRunSyntaxError(t *testing.T) {
	c := newTestEnv(t).dial(t)
	err := c.Run(testContext(t), "if then fi (", nil, nil, nil)
	var exitErr *staging.ExitError
	if !errors.As(err, &exitErr) || exitErr.Status != 2 || !strings.Contains(exitErr.Stderr, "syntax error") {
		t.Errorf("got %#v, want status 2 and the shell's syntax error", err)
	}
}

func TestConcurrentSessions(t *testing.T) {
	c := newTestEnv(t).dial(t)
	ctx := testContext(t)
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			out, err := c.Output(ctx, "echo "+strconv.Itoa(i))
			if err == nil && string(out) != strconv.Itoa(i)+"\n" {
				err = errors.New("session " + strconv.Itoa(i) + " got " + string(out))
			}
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
