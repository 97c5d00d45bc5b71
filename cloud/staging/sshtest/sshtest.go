// Package sshtest runs Debian's real OpenSSH sshd on loopback for tests, so
// the staging engine's ssh and rsync paths meet the server they will meet in
// production rather than a Go imitation of it.
package sshtest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// SSHD is the server binary; sshd refuses to run unless started by its
// absolute path, because it re-executes itself for each connection.
const SSHD = "/usr/sbin/sshd"

// PrivsepDir must exist for sshd to start, even when not run as root. CI
// creates it (it is outside any test's temporary directory).
const PrivsepDir = "/run/sshd"

// Server is one running sshd.
type Server struct {
	t              testing.TB
	dir            string
	addr           string
	user           string
	hostKey        ssh.PublicKey
	authorizedKeys string
	mu             sync.Mutex // guards authorized_keys
}

// Start runs sshd on 127.0.0.1 with a fresh ed25519 host key, trusting the
// keys given to AuthorizeKey, and stops it when the test ends. It skips the
// test when sshd or its privilege-separation directory is missing (fails it
// under HANGAR_REQUIRE_TOOLS=1: see testutil.ToolMissing).
func Start(t testing.TB) *Server {
	t.Helper()
	if _, err := os.Stat(SSHD); err != nil {
		testutil.ToolMissing(t, "sshtest: %s not found (install openssh-server): %v", SSHD, err)
	}
	if _, err := os.Stat(PrivsepDir); err != nil {
		testutil.ToolMissing(t, "sshtest: sshd needs its privilege-separation directory (mkdir -p %s && chmod 0755 %s): %v", PrivsepDir, PrivsepDir, err)
	}
	u, err := user.Current()
	if err != nil {
		t.Fatalf("sshtest: finding the current user: %v", err)
	}
	s := &Server{t: t, dir: t.TempDir(), user: u.Username}
	s.authorizedKeys = filepath.Join(s.dir, "authorized_keys")
	if err := os.WriteFile(s.authorizedKeys, nil, 0o600); err != nil {
		t.Fatalf("sshtest: writing authorized_keys: %v", err)
	}
	if err := os.Mkdir(s.tmpDir(), 0o700); err != nil {
		t.Fatalf("sshtest: making the sessions' TMPDIR: %v", err)
	}
	hostKeyPath := filepath.Join(s.dir, "ssh_host_ed25519_key")
	if s.hostKey, err = writeHostKey(hostKeyPath); err != nil {
		t.Fatalf("sshtest: %v", err)
	}

	// The free port is found by listening and closing, so another process
	// may take it before sshd binds it; then sshd exits and we try again.
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("sshtest: finding a free port: %v", err)
		}
		if lastErr = s.run(t, hostKeyPath, port); lastErr == nil {
			return s
		}
	}
	t.Fatalf("sshtest: starting sshd: %v", lastErr)
	return nil
}

func (s *Server) run(t testing.TB, hostKeyPath string, port int) error {
	config := filepath.Join(s.dir, fmt.Sprintf("sshd_config.%d", port))
	text := strings.Join([]string{
		"Port " + strconv.Itoa(port),
		"ListenAddress 127.0.0.1",
		"HostKey " + hostKeyPath,
		"AuthorizedKeysFile " + s.authorizedKeys,
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"UsePAM no",
		// The test's files sit in a temporary directory whose owners and
		// modes sshd would otherwise reject.
		"StrictModes no",
		"PidFile none",
		"PermitRootLogin prohibit-password",
		"LogLevel INFO",
		// Tests open many connections at once; the default drops some.
		"MaxStartups 100",
		"MaxSessions 100",
		// Commands that make temporary files on the "server" make them
		// in the test's directory, not in the machine's /tmp.
		"SetEnv TMPDIR=" + s.tmpDir(),
		"",
	}, "\n")
	if err := os.WriteFile(config, []byte(text), 0o600); err != nil {
		return fmt.Errorf("writing sshd config: %w", err)
	}
	log := &syncBuffer{}
	cmd := exec.Command(SSHD, "-D", "-e", "-f", config)
	cmd.Stdout = log
	cmd.Stderr = log
	// Per-connection sshd children inherit the log pipe; do not let one a
	// client left open keep Wait from returning.
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("running sshd: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("sshd exited (%w): %s", err, log.String())
		default:
		}
		if strings.Contains(log.String(), "Server listening on") {
			break
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			werr := <-exited
			return fmt.Errorf("sshd did not listen on %s within 10s (then killed: %w): %s", addr, werr, log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.addr = addr
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			_ = err // stopped by SIGTERM: Wait's error only says so
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			t.Logf("sshtest: sshd ignored SIGTERM for 5s, killed: %v", <-exited)
		}
		if t.Failed() {
			t.Logf("sshd log:\n%s", log.String())
		}
	})
	return nil
}

// TempDir is the TMPDIR of the server's sessions, inside the test's
// temporary directory.
func (s *Server) TempDir() string { return s.tmpDir() }

func (s *Server) tmpDir() string { return filepath.Join(s.dir, "tmp") }

// Addr is the server's "127.0.0.1:port".
func (s *Server) Addr() string { return s.addr }

// Port is the server's port.
func (s *Server) Port() int {
	_, port, _ := net.SplitHostPort(s.addr)
	p, _ := strconv.Atoi(port)
	return p
}

// HostKey is the key the server proves itself with.
func (s *Server) HostKey() ssh.PublicKey { return s.hostKey }

// User is the user to log in as: the one running the test, since sshd not
// running as root can let in no one else.
func (s *Server) User() string { return s.user }

// AuthorizeKey lets the key (authorized_keys form) log in. sshd reads the
// file on every login, so it takes effect at once. Call it from the test's
// goroutine: it fails the test on error.
func (s *Server) AuthorizeKey(pub []byte) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	f, err := os.OpenFile(s.authorizedKeys, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatalf("sshtest: authorizing key: %v", err)
	}
	line := append(bytes.TrimSpace(pub), '\n')
	_, err = f.Write(line)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		s.t.Fatalf("sshtest: authorizing key: %v", err)
	}
}

func writeHostKey(path string) (ssh.PublicKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating host key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "sshtest")
	if err != nil {
		return nil, fmt.Errorf("encoding host key: %w", err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return nil, fmt.Errorf("writing host key: %w", err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encoding host key: %w", err)
	}
	return signer.PublicKey(), nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// syncBuffer collects sshd's log, written by exec's copying goroutine and
// read by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
