package staging

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
)

// Tags that mark what the staging engine made, so that any later process
// (a restarted one, another machine with the same key directory) finds it.
const (
	TagRole   = "hangar:staging"      // "server", "volume", "snapshot", "image"
	TagName   = "hangar:staging-name" // the server's or volume's symbolic name
	TagFSType = "hangar:staging-fstype"
	TagMount  = "hangar:staging-mount"
	TagLabel  = "hangar:staging-label"
)

// OnExit says what Close does with the servers the manager knows.
const (
	OnExitStop      = "stop"
	OnExitTerminate = "terminate"
	OnExitRun       = "run"
)

// Options configures a Manager.
type Options struct {
	// Provider is the cloud; it must implement cloud.Storage.
	Provider cloud.Provider
	// ProviderName names it in key and tag names ("local", "aws" …).
	ProviderName string
	// Dir keeps the ssh key pairs (0600) and the known_hosts file.
	Dir string

	// Servers: how new staging servers are launched and logged into.
	Image          string
	InstanceType   string
	Zone           string // default zone for servers and volumes; "" = the cloud's choice
	User           string // ssh login
	Sudo           bool   // run privileged commands (mount, rsync) with sudo -n
	Subnets        []string
	SecurityGroups []string
	OnExit         string        // "stop" (default), "terminate", "run"
	ReadyTimeout   time.Duration // launch → ssh works; default 10 min

	// OtherRegion opens the same cloud in another region, for copies.
	OtherRegion func(ctx context.Context, region string) (*Manager, error)

	// Progress gets what the person at the terminal should see (rsync
	// progress, "waiting for …"); nil discards it.
	Progress io.Writer
	Logger   *slog.Logger
}

// Manager provisions and tracks staging servers and volumes in one region
// of one cloud, like Perl's VM::EC2::Staging::Manager.
type Manager struct {
	opts    Options
	log     *slog.Logger
	out     io.Writer
	cloud   cloud.Provider
	storage cloud.Storage
	sshPort int

	signer  ssh.Signer
	keyPath string
	keyName string
	kh      *KnownHosts

	mu      sync.Mutex
	servers map[string]*Server // by name
	clients map[string]*Client // by instance id
}

// New opens a manager: it loads (or creates) the region's ssh key, imports
// it into the cloud, and scans the region for existing staging servers.
func New(ctx context.Context, opts Options) (*Manager, error) {
	st, ok := opts.Provider.(cloud.Storage)
	if !ok {
		return nil, fmt.Errorf("staging on %s: the provider has no volumes or snapshots: %w", opts.ProviderName, cloud.ErrNotSupported)
	}
	if opts.OnExit == "" {
		opts.OnExit = OnExitStop
	}
	if !slices.Contains([]string{OnExitStop, OnExitTerminate, OnExitRun}, opts.OnExit) {
		return nil, fmt.Errorf("staging: on_exit %q is not stop, terminate or run", opts.OnExit)
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = 10 * time.Minute
	}
	if opts.User == "" {
		return nil, errors.New("staging: no ssh user given")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{
		opts:    opts,
		log:     log,
		out:     orDiscard(opts.Progress),
		cloud:   opts.Provider,
		storage: st,
		sshPort: opts.Provider.Capabilities().SSHPort,
		kh:      &KnownHosts{Path: filepath.Join(opts.Dir, "known_hosts")},
		servers: map[string]*Server{},
		clients: map[string]*Client{},
	}
	if m.sshPort == 0 {
		m.sshPort = 22
	}
	// One key pair per provider and region, as the Perl manager's reuse_key.
	keyFile := opts.ProviderName + "-" + st.Region()
	signer, pub, path, err := LoadOrCreateKey(opts.Dir, keyFile)
	if err != nil {
		return nil, fmt.Errorf("staging on %s: %w", keyFile, err)
	}
	m.signer, m.keyPath = signer, path
	// The cloud-side name carries the key's fingerprint, so a machine with
	// another key directory imports its own key instead of colliding.
	sum := sha256.Sum256(signer.PublicKey().Marshal())
	m.keyName = "hangar-staging-" + hex.EncodeToString(sum[:6])
	if err := st.ImportKeyPair(ctx, m.keyName, pub); err != nil {
		return nil, fmt.Errorf("staging on %s: %w", keyFile, err)
	}
	if err := m.Scan(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// Region is the manager's region.
func (m *Manager) Region() string { return m.storage.Region() }

// Storage is the cloud's storage half, for callers that need raw access.
func (m *Manager) Storage() cloud.Storage { return m.storage }

// Close does the on_exit action to the servers this manager knows and
// closes its ssh connections.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	var ids []string
	for _, s := range m.servers {
		if s.Instance.State == cloud.StateRunning || s.Instance.State == cloud.StatePending {
			ids = append(ids, s.Instance.ID)
		}
	}
	for _, c := range m.clients {
		c.Close()
	}
	m.clients = map[string]*Client{}
	m.mu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	var err error
	switch m.opts.OnExit {
	case OnExitStop:
		if m.cloud.Capabilities().StopStart {
			_, err = m.cloud.Stop(ctx, ids)
		}
	case OnExitTerminate:
		_, err = m.cloud.Terminate(ctx, ids)
	}
	if err != nil {
		return fmt.Errorf("closing staging manager (on_exit %s): %w", m.opts.OnExit, err)
	}
	return nil
}

// Scan synchronizes the manager with the servers the cloud has, by tags.
func (m *Manager) Scan(ctx context.Context) error {
	insts, err := m.cloud.List(ctx, map[string]string{TagRole: "server"})
	if err != nil {
		return fmt.Errorf("scanning for staging servers: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := map[string]bool{}
	for _, inst := range insts {
		if gone(inst.State) {
			continue
		}
		name := inst.Tags[TagName]
		if s, ok := m.servers[name]; ok && s.Instance.ID != inst.ID && !gone(s.Instance.State) {
			// Two live servers with one name: keep the older, as get_server would.
			if s.Instance.LaunchedAt.Before(inst.LaunchedAt) {
				continue
			}
		}
		m.servers[name] = &Server{Name: name, Instance: inst, m: m}
		seen[name] = true
	}
	for name := range m.servers {
		if !seen[name] {
			delete(m.servers, name)
		}
	}
	return nil
}

func gone(s cloud.State) bool {
	return s == cloud.StateTerminated || s == cloud.StateTerminating
}

// newName is a random name like the Perl manager's "volume-1a2b3c4d".
func newName(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// waitFor polls check with backoff until it says done, fails, or timeout
// passes. what names the wait for errors and the progress line.
func (m *Manager) waitFor(ctx context.Context, what string, timeout time.Duration, check func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	delay := 100 * time.Millisecond
	announced := time.Now().Add(2 * time.Second)
	for {
		done, err := check(ctx)
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		if done {
			return nil
		}
		if !announced.IsZero() && time.Now().After(announced) {
			fmt.Fprintf(m.out, "waiting for %s …\n", what)
			announced = time.Time{}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, context.Cause(ctx))
		case <-time.After(delay):
		}
		delay = min(delay*2, 5*time.Second)
	}
}
