package bootstrap

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/scripts"
)

const (
	enrollBatchToken  = "batch_TOKEN-0123456789abcdef"
	enrollIssuedToken = "issued_TOKEN-fedcba9876543210"
	enrollInstanceID  = "i-0123456789abcdef0"
)

// enrollingBackend is Hangar's side of a batched instance's life in
// generic.sh: it enrolls (after pending 503s, or refusing), takes the ready
// report and the first poll with the issued token, and terminates.
type enrollingBackend struct {
	pending int  // Enroll answers ErrEnrollPending this many times first
	refuse  bool // Enroll refuses

	mu       sync.Mutex
	enrolls  []Enrollment
	readies  int
	polls    int
	onCmdLin []string // processes whose command line showed a token
}

func (b *enrollingBackend) Authenticate(hash string) (string, error) {
	if hash == HashToken(enrollIssuedToken) {
		return "i1", nil
	}
	return "", ErrUnauthorized
}

func (b *enrollingBackend) AuthenticateBatch(hash string) (string, error) {
	if hash == HashToken(enrollBatchToken) {
		return "p1", nil
	}
	return "", ErrUnauthorized
}

func (b *enrollingBackend) Enroll(ctx context.Context, hash string, e Enrollment) (string, error) {
	// curl is running now: its command line must not show the token.
	leaks := commandLinesWith(enrollBatchToken)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.onCmdLin = append(b.onCmdLin, leaks...)
	b.enrolls = append(b.enrolls, e)
	switch {
	case hash != HashToken(enrollBatchToken):
		return "", ErrUnauthorized
	case b.pending > 0:
		b.pending--
		return "", ErrEnrollPending
	case b.refuse:
		return "", fmt.Errorf("%w: other_batch", ErrUnauthorized)
	}
	return enrollIssuedToken, nil
}

func (b *enrollingBackend) Script(context.Context, string) ([]byte, error) {
	return nil, errors.New("not asked for in these tests")
}

func (b *enrollingBackend) Ready(ctx context.Context, instance string, r Ready) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.readies++
	return nil
}

func (b *enrollingBackend) Assignment(ctx context.Context, instance string, p Poll) (Assignment, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.polls++
	return Assignment{State: AssignTerminate}, nil
}

func (b *enrollingBackend) Heartbeat(context.Context, string, Heartbeat) error { return nil }

func (b *enrollingBackend) OpenOutput(context.Context, string, string, int) (io.Writer, error) {
	return nil, ErrNotCurrent
}

func (b *enrollingBackend) Exit(context.Context, string, string, int, int) error {
	return ErrNotCurrent
}

// commandLinesWith lists the processes whose command line holds s.
func commandLinesWith(s string) []string {
	var found []string
	paths, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range paths {
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(s)) {
			found = append(found, p)
		}
	}
	return found
}

// fakeIMDS is EC2's instance metadata service as far as enrollment reads
// it: IMDSv2 (a PUT for a token, which every read then carries) unless v1,
// the instance id, and the identity document and its signature.
type fakeIMDS struct {
	v1        bool // no tokens: IMDSv1 only
	failFirst int  // the first reads of the instance id answer 500

	mu        sync.Mutex
	reads     []string // paths read, with "(no token)" when one was missing
	document  string
	signature string
}

const imdsToken = "imds-token-AQAEAA"

func (m *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r.URL.Path == "/latest/api/token" {
		if m.v1 || r.Method != http.MethodPut || r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "forbidden", http.StatusForbidden)
			return
		}
		_, _ = io.WriteString(w, imdsToken)
		return
	}
	hasToken := r.Header.Get("X-aws-ec2-metadata-token") == imdsToken
	if !m.v1 && !hasToken {
		m.reads = append(m.reads, r.URL.Path+" (no token)")
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	m.reads = append(m.reads, r.URL.Path)
	switch r.URL.Path {
	case "/latest/meta-data/instance-id":
		if m.failFirst > 0 {
			m.failFirst--
			http.Error(w, "not yet", http.StatusInternalServerError)
			return
		}
		_, _ = io.WriteString(w, enrollInstanceID)
	case "/latest/dynamic/instance-identity/document":
		_, _ = io.WriteString(w, m.document)
	case "/latest/dynamic/instance-identity/signature":
		_, _ = io.WriteString(w, m.signature)
	default:
		http.NotFound(w, r)
	}
}

// enrollRun is one run of generic.sh in dir, as a batch's user-data runs
// it: with the batch token (or token) and HANGAR_ENROLL=1.
func enrollRun(t *testing.T, dir string, hangar, imds *httptest.Server, token string, env ...string) (string, int) {
	t.Helper()
	script := filepath.Join(dir, "generic.sh")
	b, err := scripts.BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(script, b, 0o700); err != nil {
		t.Fatal(err)
	}
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
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Dir = dir
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + dir,
		"TMPDIR=" + dir,
		"HANGAR_ROOT=" + dir,
		"HANGAR_URL=" + hangar.URL,
		"HANGAR_POOL=p1",
		"HANGAR_SSH_HOST_KEY_FILE=" + key,
		"HANGAR_METADATA_URL=" + imds.URL,
		"HANGAR_BOOTSTRAP_TOKEN=" + token,
		"HANGAR_ENROLL=1",
	}, env...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
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
	}
	t.Fatalf("running generic.sh: %v\n%s", err, output)
	return "", 0
}

// TestGenericEnroll runs generic.sh, as a batch's user-data does, against a
// fake metadata service and the real handler on a fake pool: it enrolls
// with its instance id and a kept enroll key, then reports ready and polls
// with the issued token, which it saves as descending from the batch token,
// so that the user-data run again after a stop and start enrolls no more.
func TestGenericEnroll(t *testing.T) {
	doc, sig, verifier := signedIdentity(t)
	for _, c := range []*struct {
		name        string
		imds        fakeIMDS         // v1 and failFirst
		backend     enrollingBackend // pending and refuse
		env         []string
		code        int
		say         string // in the output
		enrolls     int    // calls to Enroll; -1: at least one
		signed      bool
		wantIssued  bool
		wantReadies int
	}{
		{name: "enrolls", code: 0, say: "enrolled instance " + enrollInstanceID, enrolls: 1, wantIssued: true, wantReadies: 1},
		{name: "IMDSv1", imds: fakeIMDS{v1: true}, code: 0, enrolls: 1, wantIssued: true, wantReadies: 1},
		{name: "signed", env: []string{"HANGAR_IDENTITY=signed"}, code: 0, enrolls: 1, signed: true, wantIssued: true, wantReadies: 1},
		{name: "retries 503", backend: enrollingBackend{pending: 1}, code: 0,
			say: "Hangar cannot enroll instance " + enrollInstanceID + " yet (HTTP 503); retrying in 2s", enrolls: 2, wantIssued: true, wantReadies: 1},
		{name: "waits for the metadata service", imds: fakeIMDS{failFirst: 1}, code: 0,
			say: "reading the instance id from the metadata service", enrolls: 1, wantIssued: true, wantReadies: 1},
		{name: "refused exits", backend: enrollingBackend{refuse: true}, code: 1,
			say: "enrollment refused for instance " + enrollInstanceID, enrolls: 1},
		{name: "gives up", backend: enrollingBackend{pending: 1000}, env: []string{"HANGAR_ENROLL_TIMEOUT=1"}, code: 1,
			say: "giving up: Hangar cannot enroll instance " + enrollInstanceID + " yet (HTTP 503)", enrolls: -1},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			c.imds.document, c.imds.signature = doc, sig
			imds := httptest.NewServer(&c.imds)
			defer imds.Close()
			var logs syncBuffer
			hangar := httptest.NewServer(Handler(&c.backend, slog.New(slog.NewTextHandler(&logs, nil))))
			defer hangar.Close()

			out, code := enrollRun(t, dir, hangar, imds, enrollBatchToken, c.env...)
			t.Logf("output:\n%s", out)
			if code != c.code {
				t.Errorf("exit status %d, want %d", code, c.code)
			}
			if !strings.Contains(out, c.say) {
				t.Errorf("the output does not say %q", c.say)
			}
			for _, tok := range []string{enrollBatchToken, enrollIssuedToken} {
				if strings.Contains(out, tok) || strings.Contains(logs.String(), tok) {
					t.Errorf("the output or Hangar's log shows a token")
				}
			}
			b := &c.backend
			b.mu.Lock()
			enrolls, readies, polls, leaks := b.enrolls, b.readies, b.polls, b.onCmdLin
			b.mu.Unlock()
			if len(enrolls) != c.enrolls && (c.enrolls >= 0 || len(enrolls) == 0) {
				t.Fatalf("%d enrollments, want %d", len(enrolls), c.enrolls)
			}
			if len(leaks) > 0 {
				t.Errorf("a command line showed the batch token while enrolling: %v", leaks)
			}
			stateDir := filepath.Join(dir, "var/lib/hangar")
			key, err := os.ReadFile(filepath.Join(stateDir, "enroll-key"))
			if err != nil {
				t.Fatal(err)
			}
			if fi, err := os.Stat(filepath.Join(stateDir, "enroll-key")); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("enroll-key: %v, mode %v; want 0600", err, fi.Mode())
			}
			for i, e := range enrolls {
				if e.InstanceID != enrollInstanceID || e.EnrollKey != string(key) {
					t.Errorf("enrollment %d: instance %q, key %q; want %q and the saved key %q", i, e.InstanceID, e.EnrollKey, enrollInstanceID, key)
				}
				if c.signed && (string(e.Document) != doc || string(e.Signature) != sig) {
					t.Errorf("enrollment %d: document %q, signature %q; want what the metadata service served", i, e.Document, e.Signature)
				}
				if _, err := verifier.Verify("local", e.Document, e.Signature); c.signed && err != nil {
					t.Errorf("enrollment %d: the identity does not verify: %v", i, err)
				}
				if !c.signed && (e.Document != nil || e.Signature != nil) {
					t.Errorf("enrollment %d sent an identity unasked", i)
				}
			}
			c.imds.mu.Lock()
			reads := c.imds.reads
			c.imds.mu.Unlock()
			for _, r := range reads {
				if strings.HasSuffix(r, "(no token)") {
					t.Errorf("the metadata service was read without its token: %s", r)
				}
			}
			saved, _ := os.ReadFile(filepath.Join(stateDir, "bootstrap-token"))
			wantSaved := HashToken(enrollBatchToken) + " " + enrollIssuedToken + "\n"
			if c.wantIssued != (string(saved) == wantSaved) {
				t.Errorf("token file says %q; want the issued token after the batch token's hash: %v", saved, c.wantIssued)
			}
			if readies != c.wantReadies || readies > 0 && polls == 0 {
				t.Errorf("%d ready reports and %d polls with the issued token; want %d ready", readies, polls, c.wantReadies)
			}
			if !c.wantIssued {
				return
			}

			// A stop and start: the user-data runs again, with the batch
			// token (or the saved one, which it swaps in), and does not
			// enroll again.
			for _, token := range []string{enrollBatchToken, enrollIssuedToken} {
				out, code := enrollRun(t, dir, hangar, imds, token, c.env...)
				if code != 0 || strings.Contains(out, "enroll") {
					t.Errorf("run again: exit status %d, output:\n%s", code, out)
				}
			}
			b.mu.Lock()
			defer b.mu.Unlock()
			if len(b.enrolls) != c.enrolls || b.readies != c.wantReadies+2 {
				t.Errorf("after two more boots, %d enrollments and %d ready reports; want %d and %d", len(b.enrolls), b.readies, c.enrolls, c.wantReadies+2)
			}
		})
	}
}

// signedIdentity returns an identity document of enrollInstanceID as EC2
// serves it (indented JSON; here with a final line break, which must reach
// Hangar too), its signature (base64 cut in lines) and a verifier for it.
func signedIdentity(t *testing.T) (doc, sig string, v *identity.Verifier) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	d, err := identity.Document{InstanceID: enrollInstanceID, Region: "local", AccountID: "000000000000"}.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	d = append(d, '\n')
	s, err := identity.Sign(key, d)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := identity.SelfSigned(key, "test")
	if err != nil {
		t.Fatal(err)
	}
	if v, err = identity.FromPEM(cert); err != nil {
		t.Fatal(err)
	}
	return string(d), string(s[:64]) + "\n" + string(s[64:]) + "\n", v
}
