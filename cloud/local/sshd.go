package local

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"
)

// sshPort is where the sshd of an instance with a key pair listens, on the
// instance's own loopback address.
const sshPort = 2222

// sshdPath and privsepDir are variables so that tests can make them missing.
var (
	// sshdPath must be absolute: sshd re-executes itself for each connection.
	sshdPath = "/usr/sbin/sshd"
	// privsepDir is the empty directory sshd running as root chroots its
	// unprivileged half into; Debian's openssh-server makes it at boot.
	privsepDir = "/run/sshd"
)

// checkSSHD says why instances with a key pair cannot run here, if they
// cannot.
func checkSSHD() error {
	if info, err := os.Stat(sshdPath); err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
		return fmt.Errorf("instances with a key pair run OpenSSH's sshd, and %s is missing or not executable; install openssh-server", sshdPath)
	}
	if os.Geteuid() == 0 {
		if info, err := os.Stat(privsepDir); err != nil || !info.IsDir() {
			return fmt.Errorf("instances with a key pair run OpenSSH's sshd, which as root needs the directory %s (openssh-server makes it at boot; mkdir -m 0755 %s)", privsepDir, privsepDir)
		}
	}
	return nil
}

// writeSSHFiles gives a new instance its host key, the key pair's key as its
// authorized_keys, and its sshd_config.
func writeSSHFiles(dir string, r *record, authorizedKey []byte) error {
	sshDir := filepath.Join(dir, "ssh")
	if err := os.Mkdir(sshDir, 0o700); err != nil {
		return err
	}
	u, err := user.Current()
	if err != nil {
		return fmt.Errorf("finding the user ssh logins run as: %w", err)
	}
	config, err := sshdConfig(dir, r, u.Username)
	if err != nil {
		return err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generating host key: %w", err)
	}
	comment := "root@" + r.ID
	block, err := ssh.MarshalPrivateKey(priv, comment)
	if err != nil {
		return fmt.Errorf("encoding host key: %w", err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return fmt.Errorf("encoding host key: %w", err)
	}
	pub := ssh.MarshalAuthorizedKey(signer.PublicKey())
	pub = append(pub[:len(pub)-1], " "+comment+"\n"...)
	files := []struct {
		name string
		data []byte
	}{
		{"ssh_host_ed25519_key", pem.EncodeToMemory(block)},
		{"ssh_host_ed25519_key.pub", pub},
		{"authorized_keys", authorizedKey},
		{"sshd_config", []byte(config)},
	}
	for _, f := range files {
		if err := writeFile(filepath.Join(sshDir, f.name), f.data, 0o600); err != nil {
			return fmt.Errorf("writing %s: %w", f.name, err)
		}
	}
	return nil
}

// sshdConfig is the sshd_config of an instance. Logins run as the server's
// own user (login) since that is who runs sshd; AllowUsers keeps a root
// server's sshd from letting the key pair in as anyone else.
func sshdConfig(dir string, r *record, login string) (string, error) {
	sshDir := filepath.Join(dir, "ssh")
	var errs []error
	q := func(s string) string {
		v, err := configQuote(s)
		errs = append(errs, err)
		return v
	}
	lines := []string{
		"# Written by Hangar's local cloud for instance " + r.ID + ".",
		"ListenAddress " + r.PrivateIP + ":" + strconv.Itoa(sshPort),
		"HostKey " + q(filepath.Join(sshDir, "ssh_host_ed25519_key")),
		// AuthorizedKeysFile expands %-tokens: a literal % is %%.
		"AuthorizedKeysFile " + strings.ReplaceAll(q(filepath.Join(sshDir, "authorized_keys")), "%", "%%"),
		"PidFile " + q(filepath.Join(sshDir, "sshd.pid")),
		"AllowUsers " + q(login),
		"UsePAM no",
		// The files are the server user's, in its directories, whatever
		// their owners and modes; sshd's checks are for home directories.
		"StrictModes no",
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PermitRootLogin prohibit-password",
		"AllowAgentForwarding yes",
		"PrintMotd no",
		"LogLevel INFO",
		"Subsystem sftp internal-sftp",
		// The staging engine runs several sessions and connections at once.
		"MaxSessions 64",
		"MaxStartups 64",
		// The marker lets Stop and Terminate find the processes of ssh
		// sessions, which sshd puts in sessions of their own.
		"SetEnv " + q(envMarker+"="+r.ID) + " " + q(rootEnv+"="+filepath.Join(dir, "disk")),
		"",
	}
	if err := errors.Join(errs...); err != nil {
		return "", fmt.Errorf("writing sshd_config: %w", err)
	}
	return strings.Join(lines, "\n"), nil
}

// configQuote quotes s for sshd_config, which splits its lines into words
// the way a shell does, but has no escape for every character.
func configQuote(s string) (string, error) {
	if s == "" || strings.ContainsAny(s, "\"\\") || strings.ContainsFunc(s, func(r rune) bool { return r < ' ' || r == 0x7f }) {
		return "", fmt.Errorf("%q cannot be written in sshd_config: quotes, backslashes and control characters are not allowed", s)
	}
	return `"` + s + `"`, nil
}
