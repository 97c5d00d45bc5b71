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
	// TagKey names the key pair a server accepts: a manager only uses
	// servers it can log into.
	TagKey = "hangar:staging-key"
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

	// Progress gets what the person at the terminal should see ("waiting
	// for …", rsync's warnings); nil discards it. LiveProgress adds lines
	// rewritten in place (rsync's and block copies' progress): set it only
	// when Progress is a terminal.
	Progress     io.Writer
	LiveProgress bool
	Logger       *slog.Logger
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
	servers map[string]*Server   // by name
	clients map[string]*Client   // by instance id
	touched map[string]bool      // instance ids launched or logged into: on_exit's
	holds   map[string]io.Closer // by instance id: our in-use locks
}

// A Manager's methods may be called from one goroutine at a time; its lock
// only guards what its servers' connections share.

// New opens a manager: it loads (or creates) the region's ssh key, imports
// it into the cloud, and scans the region for existing staging servers.
func New(ctx context.Context, opts Options) (*Manager, error) {
	st, ok := cloud.StorageOf(opts.Provider)
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
		touched: map[string]bool{},
		holds:   map[string]io.Closer{},
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

// Provider is the cloud the manager works on.
func (m *Manager) Provider() cloud.Provider { return m.cloud }

// Storage is the cloud's storage half, for callers that need raw access.
func (m *Manager) Storage() cloud.Storage { return m.storage }

// Close does the on_exit action to the servers this manager used (launched
// or logged into) and closes its ssh connections. A server another
// `hangar staging` process is using at that moment is left running: every
// connection holds a shared lock on the server (see holdInUse) and a
// server is only stopped or terminated when an exclusive one can be had.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	var used []*Server
	for _, s := range m.servers {
		if m.touched[s.Instance.ID] {
			used = append(used, s)
		}
	}
	clients, holds := m.clients, m.holds
	m.clients, m.holds = map[string]*Client{}, map[string]io.Closer{}
	m.mu.Unlock()
	for _, h := range holds {
		_ = h.Close()
	}

	var ids []string
	for _, s := range used {
		c := clients[s.Instance.ID]
		if c == nil {
			continue // never reached: nothing of ours runs there
		}
		if m.opts.OnExit != OnExitRun && !inUseByOthers(ctx, c) {
			ids = append(ids, s.Instance.ID)
		} else if m.opts.OnExit != OnExitRun {
			_, _ = fmt.Fprintf(m.out, "leaving staging server %s running: another process is using it\n", s.Name)
		}
	}
	for _, c := range clients {
		_ = c.Close()
	}
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

// inUseLock is the file every connection holds a shared flock on while it
// is open; a server whose lock cannot be had exclusively is in use. Local
// cloud instances share this machine's /tmp, so theirs is in their root.
const inUseLock = "\"${HANGAR_ROOT:-/tmp}/.hangar-staging-in-use.lock\""

// holdInUse takes the shared lock on c's server and holds it until the
// returned closer is closed (or the connection ends): the remote cat reads
// a pipe that only closing ends.
func holdInUse(c *Client) io.Closer {
	r, w := io.Pipe()
	go func() {
		_ = c.Run(context.Background(), "command -v flock >/dev/null || exec cat >/dev/null; exec flock -s "+inUseLock+" cat >/dev/null", r, nil, nil)
	}()
	return w
}

// inUseByOthers reports whether another connection holds the in-use lock.
// Its own lock is released first; a server that cannot tell (no flock) is
// taken as not in use.
func inUseByOthers(ctx context.Context, c *Client) bool {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// -w 5: the holder this connection started may take a moment to go.
	err := c.Run(ctx, "command -v flock >/dev/null || exit 0; flock -x -w 5 "+inUseLock+" true", nil, nil, nil)
	var xe *ExitError
	return errors.As(err, &xe)
}

// Scan synchronizes the manager with the cloud's staging servers that
// accept its key, by tags. Known servers are updated in place.
func (m *Manager) Scan(ctx context.Context) error {
	insts, err := m.cloud.List(ctx, map[string]string{TagRole: "server", TagKey: m.keyName})
	if err != nil {
		return fmt.Errorf("scanning for staging servers: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	byID := map[string]*Server{}
	for _, s := range m.servers {
		byID[s.Instance.ID] = s
	}
	next := map[string]*Server{}
	for _, inst := range insts {
		if gone(inst.State) {
			continue
		}
		name := inst.Tags[TagName]
		// Two live servers with one name: keep the older, as get_server would.
		if o, ok := next[name]; ok && o.Instance.LaunchedAt.Before(inst.LaunchedAt) {
			continue
		}
		s := byID[inst.ID]
		if s == nil {
			s = &Server{Name: name, m: m}
		}
		s.Instance = inst
		next[name] = s
	}
	m.servers = next
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
			_, _ = fmt.Fprintf(m.out, "waiting for %s …\n", what)
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

// liveProgress is where lines rewritten in place go: Progress when it is a
// terminal, else nowhere.
func (m *Manager) liveProgress() io.Writer {
	if m.opts.LiveProgress {
		return m.opts.Progress
	}
	return nil
}
