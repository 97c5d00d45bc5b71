package staging_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"crypto/ed25519"
	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud/staging"
)

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	signer, pub, path, err := staging.LoadOrCreateKey(dir, "local-us-east-1")
	if err != nil {
		t.Fatalf("creating key: %v", err)
	}
	if signer.PublicKey().Type() != ssh.KeyAlgoED25519 {
		t.Errorf("key type %s, want ed25519", signer.PublicKey().Type())
	}
	assertMode(t, dir, 0o700)
	assertMode(t, path, 0o600)
	if filepath.Dir(path) != dir {
		t.Errorf("key path %s not in %s", path, dir)
	}
	pubFile, err := os.ReadFile(path + ".pub")
	if err != nil {
		t.Fatalf("reading public key file: %v", err)
	}
	filePub, _, _, _, err := ssh.ParseAuthorizedKey(pubFile)
	if err != nil {
		t.Fatalf("parsing public key file: %v", err)
	}
	if !bytes.Equal(filePub.Marshal(), signer.PublicKey().Marshal()) {
		t.Error("public key file does not match the private key")
	}

	signer2, pub2, path2, err := staging.LoadOrCreateKey(dir, "local-us-east-1")
	if err != nil {
		t.Fatalf("reloading key: %v", err)
	}
	if !bytes.Equal(pub, pub2) || path != path2 || !bytes.Equal(signer2.PublicKey().Marshal(), signer.PublicKey().Marshal()) {
		t.Error("reloading gave another key")
	}

	_, pub3, _, err := staging.LoadOrCreateKey(dir, "ec2-eu-west-1")
	if err != nil {
		t.Fatalf("creating second key: %v", err)
	}
	if bytes.Equal(pub, pub3) {
		t.Error("two names share one key")
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, _, err = staging.LoadOrCreateKey(dir, "local-us-east-1")
	if err == nil || !strings.Contains(err.Error(), "mode 0644") || !strings.Contains(err.Error(), path) {
		t.Errorf("loading a 0644 key: got %v, want an error naming the file and its mode", err)
	}
}

func TestLoadOrCreateKeyRefusesBadNames(t *testing.T) {
	for _, name := range []string{"", "../x", "a/b", ".hidden"} {
		if _, _, _, err := staging.LoadOrCreateKey(t.TempDir(), name); err == nil {
			t.Errorf("name %q accepted", name)
		}
	}
}

func TestPin(t *testing.T) {
	kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "state", "known_hosts")}
	key1, key2 := newPublicKey(t), newPublicKey(t)
	if err := kh.Pin("10.0.0.1:2222", key1); err != nil {
		t.Fatalf("pinning: %v", err)
	}
	if err := kh.Pin("10.0.0.1:2222", key1); err != nil {
		t.Fatalf("pinning the same key again: %v", err)
	}
	// The same address on another port is another host for OpenSSH.
	if err := kh.Pin("10.0.0.1", key2); err != nil {
		t.Fatalf("pinning port 22: %v", err)
	}
	err := kh.Pin("10.0.0.1:2222", key2)
	if !errors.Is(err, staging.ErrHostKeyChanged) || !strings.Contains(err.Error(), "changed") {
		t.Errorf("pinning another key: got %v, want ErrHostKeyChanged", err)
	}
	data, err := os.ReadFile(kh.Path)
	if err != nil {
		t.Fatal(err)
	}
	want := "[10.0.0.1]:2222 " + strings.TrimSpace(string(ssh.MarshalAuthorizedKey(key1))) + "\n" +
		"10.0.0.1 " + strings.TrimSpace(string(ssh.MarshalAuthorizedKey(key2))) + "\n"
	if string(data) != want {
		t.Errorf("known_hosts:\n%s\nwant:\n%s", data, want)
	}
	assertMode(t, kh.Path, 0o600)

	check, err := kh.HostKeyCallback()
	if err != nil {
		t.Fatal(err)
	}
	addr := fakeTCPAddr(t, "10.0.0.1:2222")
	if err := check("10.0.0.1:2222", addr, key1); err != nil {
		t.Errorf("pinned key refused: %v", err)
	}
	if err := check("10.0.0.1:2222", addr, key2); !errors.Is(err, staging.ErrHostKeyChanged) {
		t.Errorf("changed key: got %v, want ErrHostKeyChanged", err)
	}
	if err := check("10.0.0.2:2222", addr, key1); !errors.Is(err, staging.ErrUnknownHost) {
		t.Errorf("unknown host: got %v, want ErrUnknownHost", err)
	}
}

func TestHostKeyCallbackWithoutFile(t *testing.T) {
	kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
	check, err := kh.HostKeyCallback()
	if err != nil {
		t.Fatal(err)
	}
	if err := check("10.0.0.1:22", fakeTCPAddr(t, "10.0.0.1:22"), newPublicKey(t)); !errors.Is(err, staging.ErrUnknownHost) {
		t.Errorf("got %v, want ErrUnknownHost", err)
	}
}

func newPublicKey(t *testing.T) ssh.PublicKey {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Mode().Perm(); got != want {
		t.Errorf("%s has mode %04o, want %04o", path, got, want)
	}
}

func TestPinConcurrently(t *testing.T) {
	kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
	key := newPublicKey(t)
	errs := make(chan error, 10)
	for range 10 {
		go func() { errs <- kh.Pin("10.0.0.9:22", key) }()
	}
	for range 10 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	data, err := os.ReadFile(kh.Path)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(data), "\n"); n != 1 {
		t.Errorf("known_hosts has %d lines, want 1:\n%s", n, data)
	}
}
