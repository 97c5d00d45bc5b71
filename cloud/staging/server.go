package staging

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/shell"
)

// Server is a staging server: an instance the manager launched to run
// commands and copies on, logged into with the manager's key.
type Server struct {
	Name     string         `json:"name"`
	Instance cloud.Instance `json:"instance"`

	m *Manager
	// root is where "/" of the server is on the machine ssh reaches: "" on
	// real machines, the instance's directory on the local cloud
	// (HANGAR_ROOT), whose instances share this machine's filesystem.
	root      string
	rootKnown bool
}

// ServerSpec overrides the manager's defaults for one server.
type ServerSpec struct {
	Name         string // "" = a random "server-…" name
	Zone         string
	InstanceType string
	Image        string
}

// serverUserData boots a staging server. Its ssh host keys reach the
// console through cloud-init on first boot; a per-boot script prints them
// again on every later boot, so a server stopped before its key was pinned
// can still be pinned. It also adds rsync and xfsprogs, which minimal
// images lack. The local cloud (HANGAR_ROOT set) prints its own keys and
// has the tools; its instances must not touch this machine's /var.
const serverUserData = `#!/bin/sh
# Hangar staging server.
[ -n "${HANGAR_ROOT-}" ] && exit 0
mkdir -p /var/lib/cloud/scripts/per-boot
printf '%s\n' '#!/bin/sh' \
	'{ echo "-----BEGIN SSH HOST KEY KEYS-----"; cat /etc/ssh/ssh_host_*_key.pub; echo "-----END SSH HOST KEY KEYS-----"; } >/dev/console 2>&1' \
	>/var/lib/cloud/scripts/per-boot/hangar-host-keys
chmod 755 /var/lib/cloud/scripts/per-boot/hangar-host-keys
missing=
command -v rsync >/dev/null 2>&1 || missing="$missing rsync"
command -v mkfs.xfs >/dev/null 2>&1 || missing="$missing xfsprogs"
[ -z "$missing" ] ||
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } || # word splitting wanted
	echo "hangar staging: could not install$missing" >&2
`

// Servers returns the servers the manager knows, by name.
func (m *Manager) Servers() []*Server {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*Server, 0, len(m.servers))
	for _, s := range m.servers {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *Server) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// FindServerByInstance returns the server running as instance id, or nil.
func (m *Manager) FindServerByInstance(id string) *Server {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.servers {
		if s.Instance.ID == id {
			return s
		}
	}
	return nil
}

// FindServer returns the server called name (or running as instance id
// name), or nil.
func (m *Manager) FindServer(name string) *Server {
	m.mu.Lock()
	s := m.servers[name]
	m.mu.Unlock()
	if s == nil {
		s = m.FindServerByInstance(name)
	}
	return s
}

// ProvisionServer launches a new server and waits until ssh works on it.
func (m *Manager) ProvisionServer(ctx context.Context, spec ServerSpec) (*Server, error) {
	if spec.Name == "" {
		spec.Name = newName("server")
	}
	if err := shell.ValidName(spec.Name); err != nil {
		return nil, fmt.Errorf("provisioning staging server: %w", err)
	}
	if m.FindServer(spec.Name) != nil {
		return nil, fmt.Errorf("provisioning staging server %s: a server of that name exists", spec.Name)
	}
	launch := cloud.LaunchSpec{
		Image:          firstNonEmpty(spec.Image, m.opts.Image),
		UserData:       []byte(serverUserData),
		Tags:           map[string]string{TagRole: "server", TagName: spec.Name, TagKey: m.keyName},
		ClientToken:    "staging-" + spec.Name + "-" + newName("t"),
		Subnets:        m.opts.Subnets,
		SecurityGroups: m.opts.SecurityGroups,
		KeyName:        m.keyName,
	}
	if t := firstNonEmpty(spec.InstanceType, m.opts.InstanceType); t != "" {
		launch.InstanceTypes = []string{t}
	}
	if z := firstNonEmpty(spec.Zone, m.opts.Zone); z != "" {
		launch.Zones = []string{z}
	}
	_, _ = fmt.Fprintf(m.out, "launching staging server %s\n", spec.Name)
	insts, err := m.cloud.Launch(ctx, launch, 1)
	if len(insts) == 0 && err == nil {
		err = errors.New("the cloud started no instance")
	}
	if err != nil {
		if len(insts) > 0 {
			if _, terr := m.cloud.Terminate(context.WithoutCancel(ctx), []string{insts[0].ID}); terr != nil {
				err = errors.Join(err, fmt.Errorf("terminating %s, which is left running: %w", insts[0].ID, terr))
			}
		}
		return nil, fmt.Errorf("provisioning staging server %s: %w", spec.Name, err)
	}
	s := &Server{Name: spec.Name, Instance: insts[0], m: m}
	m.mu.Lock()
	m.servers[spec.Name] = s
	m.mu.Unlock()
	m.log.Info("launched staging server", "name", spec.Name, "id", s.Instance.ID)
	if _, err := s.Client(ctx); err != nil {
		// A server that never became reachable (or whose start was
		// interrupted before its host key was pinned) is of no use later.
		m.dropClient(s.Instance.ID)
		m.mu.Lock()
		delete(m.servers, spec.Name)
		m.mu.Unlock()
		if _, terr := m.cloud.Terminate(context.WithoutCancel(ctx), []string{s.Instance.ID}); terr != nil {
			err = errors.Join(err, terr)
		}
		return nil, fmt.Errorf("provisioning staging server %s: %w", spec.Name, err)
	}
	return s, nil
}

// GetServer returns the server called spec.Name, started and reachable,
// or provisions it.
func (m *Manager) GetServer(ctx context.Context, spec ServerSpec) (*Server, error) {
	if s := m.FindServer(spec.Name); s != nil && spec.Name != "" {
		if _, err := s.Client(ctx); err != nil {
			return nil, err
		}
		return s, nil
	}
	return m.ProvisionServer(ctx, spec)
}

// ServerInZone returns a server in zone ("" = any), preferring running ones,
// or provisions one.
func (m *Manager) ServerInZone(ctx context.Context, zone string) (*Server, error) {
	var pick *Server
	for _, s := range m.Servers() {
		if zone != "" && s.Instance.Zone != zone {
			continue
		}
		if pick == nil || s.Instance.State == cloud.StateRunning && pick.Instance.State != cloud.StateRunning {
			pick = s
		}
	}
	if pick != nil {
		if _, err := pick.Client(ctx); err != nil {
			return nil, err
		}
		return pick, nil
	}
	return m.ProvisionServer(ctx, ServerSpec{Zone: zone})
}

// StartAllServers starts every stopped server.
func (m *Manager) StartAllServers(ctx context.Context) error {
	return m.allServers(ctx, "starting", cloud.StateStopped, m.cloud.Start)
}

// StopAllServers stops every running server.
func (m *Manager) StopAllServers(ctx context.Context) error {
	return m.allServers(ctx, "stopping", cloud.StateRunning, m.cloud.Stop)
}

// TerminateAllServers terminates every server and forgets it.
func (m *Manager) TerminateAllServers(ctx context.Context) error {
	if err := m.allServers(ctx, "terminating", -1, m.cloud.Terminate); err != nil {
		return err
	}
	return m.Scan(ctx)
}

func (m *Manager) allServers(ctx context.Context, verb string, from cloud.State, call func(context.Context, []string) ([]string, error)) error {
	if err := m.Scan(ctx); err != nil {
		return err
	}
	var ids []string
	for _, s := range m.Servers() {
		if from < 0 || s.Instance.State == from || from == cloud.StateRunning && s.Instance.State == cloud.StatePending {
			ids = append(ids, s.Instance.ID)
			m.dropClient(s.Instance.ID)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	_, _ = fmt.Fprintf(m.out, "%s %d staging servers\n", verb, len(ids))
	if _, err := call(ctx, ids); err != nil {
		return fmt.Errorf("%s staging servers: %w", verb, err)
	}
	return m.Scan(ctx)
}

func (m *Manager) dropClient(id string) {
	m.mu.Lock()
	c, h := m.clients[id], m.holds[id]
	delete(m.clients, id)
	delete(m.holds, id)
	m.mu.Unlock()
	if h != nil {
		_ = h.Close()
	}
	if c != nil {
		_ = c.Close()
	}
}

// refresh reads the server's instance from the cloud again.
func (s *Server) refresh(ctx context.Context) error {
	insts, err := s.m.cloud.List(ctx, map[string]string{TagRole: "server", TagName: s.Name})
	if err != nil {
		return fmt.Errorf("looking up staging server %s: %w", s.Name, err)
	}
	for _, inst := range insts {
		if inst.ID == s.Instance.ID {
			s.m.mu.Lock()
			s.Instance = inst
			s.m.mu.Unlock()
			return nil
		}
	}
	// Just launched servers may not be listed yet (eventual consistency).
	if s.Instance.State == cloud.StatePending {
		return nil
	}
	return fmt.Errorf("staging server %s (%s): %w", s.Name, s.Instance.ID, cloud.ErrNotFound)
}

// Client returns an ssh connection to the server, starting it if stopped,
// waiting until it runs, and pinning its host key from the console the
// first time. This is the Perl manager's wait_for_servers.
func (s *Server) Client(ctx context.Context) (*Client, error) {
	m := s.m
	m.mu.Lock()
	c := m.clients[s.Instance.ID]
	m.mu.Unlock()
	if c != nil {
		if c.Alive() {
			return c, nil
		}
		m.dropClient(s.Instance.ID) // dropped meanwhile: dial again
	}
	what := fmt.Sprintf("staging server %s (%s)", s.Name, s.Instance.ID)
	err := m.waitFor(ctx, what+" to run", m.opts.ReadyTimeout, func(ctx context.Context) (bool, error) {
		if err := s.refresh(ctx); err != nil {
			return false, err
		}
		switch st := s.Instance.State; st {
		case cloud.StateRunning:
			return true, nil
		case cloud.StateStopped:
			_, _ = fmt.Fprintf(m.out, "starting %s\n", what)
			if _, err := m.cloud.Start(ctx, []string{s.Instance.ID}); err != nil {
				return false, err
			}
			return false, nil
		case cloud.StateTerminating, cloud.StateTerminated:
			return false, fmt.Errorf("it is %s", st)
		}
		return false, nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.pinHostKey(ctx); err != nil {
		return nil, err
	}
	addr := s.Addr()
	var lastErr error
	err = m.waitFor(ctx, "ssh on "+what, m.opts.ReadyTimeout, func(ctx context.Context) (bool, error) {
		cl, err := DialAlias(ctx, addr, s.Instance.ID, m.opts.User, m.signer, m.kh)
		switch {
		case errors.Is(err, ErrHostKeyChanged), errors.Is(err, ErrUnknownHost):
			return false, err // never retried, never ignored
		case err != nil:
			lastErr = err // sshd not up yet
			return false, nil
		}
		c = cl
		return true, nil
	})
	if err != nil {
		if lastErr != nil {
			err = fmt.Errorf("%w (last attempt: %w)", err, lastErr)
		}
		return nil, err
	}
	if !s.rootKnown {
		out, err := c.Output(ctx, `printf '%s' "${HANGAR_ROOT-}"`)
		if err != nil {
			_ = c.Close()
			return nil, fmt.Errorf("reading the root of %s: %w", what, err)
		}
		s.root, s.rootKnown = string(out), true
	}
	m.mu.Lock()
	if old := m.clients[s.Instance.ID]; old != nil {
		_ = c.Close()
		c = old
	} else {
		m.clients[s.Instance.ID] = c
		m.holds[s.Instance.ID] = holdInUse(c) //nolint:contextcheck // the in-use lock is held for the connection's life, past this call's ctx; closing the hold ends it
		m.touched[s.Instance.ID] = true
	}
	m.mu.Unlock()
	return c, nil
}

// Addr is where ssh reaches the server: its public address if it has one.
func (s *Server) Addr() string {
	ip := firstNonEmpty(s.Instance.PublicIP, s.Instance.PrivateIP)
	return net.JoinHostPort(ip, strconv.Itoa(s.m.sshPort))
}

// Endpoint is the server as rsync reaches it.
func (s *Server) Endpoint() Endpoint {
	ip := firstNonEmpty(s.Instance.PublicIP, s.Instance.PrivateIP)
	return Endpoint{User: s.m.opts.User, Host: ip, Port: s.m.sshPort, Sudo: s.m.opts.Sudo, HostKeyAlias: s.Instance.ID}
}

// Path turns an absolute path of the server into one ssh can use on the
// machine it reaches (see root).
func (s *Server) Path(p string) string {
	if strings.HasPrefix(p, "/") {
		return s.root + p
	}
	return p
}

// Run runs a shell command on the server (as the login user). stdout and
// stderr may be one writer: the two streams are copied at once, so it is
// then locked for each write.
func (s *Server) Run(ctx context.Context, cmd string, stdin io.Reader, stdout, stderr io.Writer) error {
	if stdout != nil && stdout == stderr {
		stdout = lockedWriter(stdout)
		stderr = stdout
	}
	c, err := s.Client(ctx)
	if err != nil {
		return err
	}
	return c.Run(ctx, cmd, stdin, stdout, stderr)
}

// privileged prefixes cmd with sudo when the manager logs in as a user who
// needs it.
func (s *Server) privileged(cmd string) string {
	if !s.m.opts.Sudo {
		return cmd
	}
	return "sudo -n sh -c " + shell.Quote(cmd)
}

// pinHostKey pins the server's host keys from its console output unless
// they are pinned already. The console comes through the cloud's API, so it
// is as trustworthy as the account; a key seen on the wire is never
// trusted on first use.
func (s *Server) pinHostKey(ctx context.Context) error {
	if keys, err := s.m.kh.pinnedKeys(withPort(s.Instance.ID)); err == nil && len(keys) > 0 {
		return nil
	}
	what := fmt.Sprintf("the ssh host key of %s (%s) on its console", s.Name, s.Instance.ID)
	var keys []ssh.PublicKey
	err := s.m.waitFor(ctx, what, s.m.opts.ReadyTimeout, func(ctx context.Context) (bool, error) {
		out, err := s.m.cloud.ConsoleOutput(ctx, s.Instance.ID)
		if err != nil {
			return false, err
		}
		keys, err = ConsoleHostKeys(out)
		if err != nil {
			return false, err
		}
		return len(keys) > 0, nil
	})
	if err != nil {
		return err
	}
	for _, k := range keys {
		if err := s.m.kh.Pin(s.Instance.ID, k); err != nil {
			return err
		}
	}
	s.m.log.Info("pinned staging server host key", "server", s.Name, "id", s.Instance.ID, "fingerprint", ssh.FingerprintSHA256(keys[0]))
	return nil
}

const (
	hostKeysBegin = "-----BEGIN SSH HOST KEY KEYS-----"
	hostKeysEnd   = "-----END SSH HOST KEY KEYS-----"
)

// ConsoleHostKeys returns the ssh host keys in the last complete block that
// cloud-init prints to the console at boot (and the local cloud imitates).
// No block yet is no keys and no error; a block with a bad line is an error.
func ConsoleHostKeys(console []byte) ([]ssh.PublicKey, error) {
	var block, done [][]byte
	in := false
	sc := bufio.NewScanner(bytes.NewReader(console))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		switch {
		case string(line) == hostKeysBegin:
			in, block = true, nil
		case string(line) == hostKeysEnd && in:
			in, done = false, block
		case in:
			block = append(block, bytes.Clone(line))
		}
	}
	var keys []ssh.PublicKey
	for _, line := range done {
		if len(line) == 0 {
			continue
		}
		k, _, _, _, err := ssh.ParseAuthorizedKey(line)
		if err != nil {
			return nil, fmt.Errorf("reading host keys from the console: %w", err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// RunAsRoot runs a shell command on the server as root (with sudo -n when
// the manager logs in as another user).
func (s *Server) RunAsRoot(ctx context.Context, cmd string, stdin io.Reader, stdout, stderr io.Writer) error {
	return s.Run(ctx, s.privileged(cmd), stdin, stdout, stderr)
}

// StopServer stops s and waits until the cloud says it is stopped.
func (m *Manager) StopServer(ctx context.Context, s *Server) error {
	m.dropClient(s.Instance.ID)
	if _, err := m.cloud.Stop(ctx, []string{s.Instance.ID}); err != nil {
		return fmt.Errorf("stopping staging server %s: %w", s.Name, err)
	}
	return m.waitFor(ctx, "staging server "+s.Name+" to stop", m.opts.ReadyTimeout, func(ctx context.Context) (bool, error) {
		if err := s.refresh(ctx); err != nil {
			return false, err
		}
		return s.Instance.State == cloud.StateStopped, nil
	})
}

// TerminateServer terminates s and forgets it.
func (m *Manager) TerminateServer(ctx context.Context, s *Server) error {
	m.dropClient(s.Instance.ID)
	m.mu.Lock()
	delete(m.servers, s.Name)
	delete(m.touched, s.Instance.ID)
	m.mu.Unlock()
	if _, err := m.cloud.Terminate(ctx, []string{s.Instance.ID}); err != nil {
		return fmt.Errorf("terminating staging server %s (%s): %w", s.Name, s.Instance.ID, err)
	}
	return nil
}

// WaitImage waits until image id is available, and returns it.
func (m *Manager) WaitImage(ctx context.Context, id string) (cloud.Image, error) {
	var img cloud.Image
	err := m.waitFor(ctx, "image "+id, time.Hour, func(ctx context.Context) (bool, error) {
		imgs, err := m.storage.Images(ctx, cloud.Filter{IDs: []string{id}})
		switch {
		case err != nil:
			return false, err
		case len(imgs) != 1:
			return false, nil // not listed yet
		case imgs[0].State == cloud.ImageFailed:
			return false, fmt.Errorf("image %s failed", id)
		}
		img = imgs[0]
		return img.State == cloud.ImageAvailable, nil
	})
	return img, err
}
