// Package staging is Hangar's staging engine: servers, volumes, snapshots
// and copies over ssh. This file keeps its ssh identities and pinned host
// keys; ssh.go is the client built on them.
package staging

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"

	"github.com/hangar-ci/hangar/internal/shell"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Sentinel errors for errors.Is; the returned errors also say which host
// and which file.
var (
	ErrUnknownHost    = errors.New("host key not pinned")
	ErrHostKeyChanged = errors.New("host key changed")
)

// LoadOrCreateKey returns the ed25519 key pair called name (for example
// provider and region) kept under dir, creating it on first use. The private
// key is an OpenSSH PEM file of mode 0600 at path, so the ssh and rsync
// binaries can use it with -i; the public key sits beside it in path+".pub"
// and is returned in authorized_keys form for importing into the cloud.
func LoadOrCreateKey(dir, name string) (signer ssh.Signer, pubAuthorizedKey []byte, path string, err error) {
	// The name becomes a file name, so it must not be able to leave dir.
	if err := shell.ValidName(name); err != nil {
		return nil, nil, "", fmt.Errorf("loading ssh key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, "", fmt.Errorf("creating ssh key directory: %w", err)
	}
	path = filepath.Join(dir, "id_ed25519_"+name)
	signer, err = loadKey(path)
	if errors.Is(err, fs.ErrNotExist) {
		signer, err = createKey(path, name)
	}
	if err != nil {
		return nil, nil, "", err
	}
	return signer, ssh.MarshalAuthorizedKey(signer.PublicKey()), path, nil
}

func loadKey(path string) (ssh.Signer, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("loading ssh key: %w", err)
	}
	// OpenSSH refuses such a key too; accepting it here would let rsync
	// fail later with a less clear message, and the key may have leaked.
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("loading ssh key %s: mode %04o lets group or others read it; it must be 0600", path, perm)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("loading ssh key: %w", err)
	}
	signer, err := ssh.ParsePrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("parsing ssh key %s: %w", path, err)
	}
	return signer, nil
}

func createKey(path, name string) (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating ssh key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "hangar-"+name)
	if err != nil {
		return nil, fmt.Errorf("encoding ssh key: %w", err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encoding ssh key: %w", err)
	}
	// Written to a temporary file and linked into place, so no one ever
	// reads a half-written key, and when two processes race the first link
	// wins and the loser loads the winner's key instead of replacing it.
	tmp, err := writeTemp(filepath.Dir(path), pem.EncodeToMemory(block))
	if err != nil {
		return nil, fmt.Errorf("writing ssh key: %w", err)
	}
	defer func() { _ = os.Remove(tmp) }()
	if err := os.Link(tmp, path); errors.Is(err, fs.ErrExist) {
		return loadKey(path)
	} else if err != nil {
		return nil, fmt.Errorf("writing ssh key: %w", err)
	}
	pub := ssh.MarshalAuthorizedKey(signer.PublicKey())
	pub = append(pub[:len(pub)-1], []byte(" hangar-"+name+"\n")...)
	pubTmp, err := writeTemp(filepath.Dir(path), pub)
	if err != nil {
		return nil, fmt.Errorf("writing ssh public key: %w", err)
	}
	if err := os.Rename(pubTmp, path+".pub"); err != nil {
		_ = os.Remove(pubTmp)
		return nil, fmt.Errorf("writing ssh public key: %w", err)
	}
	return signer, nil
}

// writeTemp writes data to a new 0600 file in dir and returns its name.
func writeTemp(dir string, data []byte) (string, error) {
	f, err := os.CreateTemp(dir, ".tmp-key-*")
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// KnownHosts is an OpenSSH known_hosts file of pinned host keys. Hangar's
// client and the ssh binary under rsync (UserKnownHostsFile) both use it, so
// a host is trusted the same way on either path.
type KnownHosts struct {
	Path string
}

// pinMu serialises pins within the process; flock serialises processes.
var pinMu sync.Mutex

// Pin records key as the host key of host ("host" or "host:port"). Pinning
// the pinned key again does nothing. Pinning another key for a pinned host
// is an error: a host key that changes is a possible attack, and only a
// person who knows why may remove the old line.
func (kh *KnownHosts) Pin(host string, key ssh.PublicKey) (err error) {
	address := withPort(host)
	pinMu.Lock()
	defer pinMu.Unlock()
	if err := os.MkdirAll(filepath.Dir(kh.Path), 0o700); err != nil {
		return fmt.Errorf("pinning host key of %s: %w", host, err)
	}
	f, err := os.OpenFile(kh.Path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("pinning host key of %s: %w", host, err)
	}
	defer func() {
		// Closing also drops the flock; a failed close of the appended
		// line is a failed pin.
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("pinning host key of %s: %w", host, cerr)
		}
	}()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("locking %s: %w", kh.Path, err)
	}
	switch err := kh.check(address, key); {
	case err == nil:
		return nil
	case errors.Is(err, ErrUnknownHost):
	default:
		return fmt.Errorf("pinning host key of %s: %w", host, err)
	}
	if _, err := f.WriteString(knownhosts.Line([]string{address}, key) + "\n"); err != nil {
		return fmt.Errorf("pinning host key of %s: %w", host, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("pinning host key of %s: %w", host, err)
	}
	return nil
}

// HostKeyCallback returns a callback that accepts only pinned keys. It reads
// the file now; keys pinned later need a new callback.
func (kh *KnownHosts) HostKeyCallback() (ssh.HostKeyCallback, error) {
	db, err := kh.load()
	if err != nil {
		return nil, err
	}
	return func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		return kh.explain(hostname, db(hostname, remote, key), key)
	}, nil
}

func (kh *KnownHosts) load() (ssh.HostKeyCallback, error) {
	db, err := knownhosts.New(kh.Path)
	if errors.Is(err, fs.ErrNotExist) {
		// No file yet means no host is trusted, not an error of its own.
		return func(string, net.Addr, ssh.PublicKey) error {
			return &knownhosts.KeyError{}
		}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading known hosts: %w", err)
	}
	return db, nil
}

func (kh *KnownHosts) check(address string, key ssh.PublicKey) error {
	db, err := kh.load()
	if err != nil {
		return err
	}
	return kh.explain(address, db(address, fakeAddr(address), key), key)
}

// explain turns knownhosts' errors into ones that say what happened.
func (kh *KnownHosts) explain(hostname string, err error, key ssh.PublicKey) error {
	var keyErr *knownhosts.KeyError
	var revoked *knownhosts.RevokedError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &keyErr) && len(keyErr.Want) == 0:
		return fmt.Errorf("%w: %s has no pinned key in %s", ErrUnknownHost, hostname, kh.Path)
	case errors.As(err, &keyErr):
		want := keyErr.Want[0]
		return fmt.Errorf("%w: %s offered %s key %s but %s:%d pins %s key %s; refusing it",
			ErrHostKeyChanged, hostname, key.Type(), ssh.FingerprintSHA256(key),
			want.Filename, want.Line, want.Key.Type(), ssh.FingerprintSHA256(want.Key))
	case errors.As(err, &revoked):
		return fmt.Errorf("host key of %s is revoked: %w", hostname, err)
	default:
		return fmt.Errorf("checking host key of %s: %w", hostname, err)
	}
}

// pinnedKeys returns the keys pinned for address. knownhosts has no lookup,
// but its error for a key that is not pinned lists the ones that are.
func (kh *KnownHosts) pinnedKeys(address string) ([]ssh.PublicKey, error) {
	db, err := kh.load()
	if err != nil {
		return nil, err
	}
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("looking up pinned keys: %w", err)
	}
	probe, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("looking up pinned keys: %w", err)
	}
	var keyErr *knownhosts.KeyError
	if err := db(address, fakeAddr(address), probe); !errors.As(err, &keyErr) {
		return nil, kh.explain(address, err, probe)
	}
	keys := make([]ssh.PublicKey, 0, len(keyErr.Want))
	for _, k := range keyErr.Want {
		keys = append(keys, k.Key)
	}
	return keys, nil
}

// withPort adds OpenSSH's default port, which knownhosts needs to match.
func withPort(host string) string {
	if _, _, err := net.SplitHostPort(host); err == nil {
		return host
	}
	return net.JoinHostPort(host, "22")
}

// fakeAddr stands for the remote address knownhosts wants; it only matches
// on the hostname given beside it.
func fakeAddr(address string) net.Addr {
	host, port, _ := net.SplitHostPort(address)
	p, _ := strconv.Atoi(port)
	return &net.TCPAddr{IP: net.ParseIP(host), Port: p}
}
