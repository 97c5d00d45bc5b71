// Package local is Hangar's embedded default cloud: an instance is a detached
// process session on this machine that runs the instance's user-data with
// bash in a directory of its own, with its own loopback address and an
// EC2-style metadata service. It needs no account and no root.
//
// All state lives under Options.Dir, so a restarted server, or another
// process on the same directory, sees the same instances. Mutations are
// serialized across processes by a flock on the region's lock file, and
// processes on one directory share one metadata service per region, which
// outlives whichever of them started it as long as one of them runs.
//
// Regions: the region "local" is Options.Dir itself; any other region is a
// complete tree of its own under Dir/regions/<name>, with its own instances,
// storage, lock and metadata service. CopySnapshot reads other regions'
// trees under the same Dir.
//
// Storage (cloud.Storage): volumes are directories (or, when raw, sparse
// image files) and snapshots copies of them, made with cp --reflink=auto.
// An attached volume appears inside its instance as the link
// $HANGAR_ROOT/dev/sdX. HANGAR_ROOT is the instance's directory "disk" (its
// HOME and working directory), which stands for "/" of a real machine.
// Images are records naming snapshots; an instance launched from one starts
// with a copy of its root snapshot as its disk.
//
// ssh: an instance launched with a key pair runs OpenSSH's sshd (package
// openssh-server) on port 2222 of its address, with a host key of its own
// that its boot prints to the console as cloud-init does. Logins run as the
// server's own user, who runs sshd, and sshd refuses any other login name.
// Sessions carry HANGAR_ROOT and the instance's marker, and Stop and
// Terminate end them, and sshd, with the instance.
//
// It is not a sandbox: instances run as the server's user and can read what
// that user can. Their environment is cleared, though, so the server's
// secrets in environment variables do not reach them.
package local

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// Options configures a local cloud.
type Options struct {
	// Dir holds everything: instances, their disks, tombstones, tokens.
	Dir string
	// BootDelay emulates cloud boot latency: an instance is pending this
	// long, then its user-data starts.
	BootDelay time.Duration
	// MetadataAddr is the metadata service's listen address, on loopback
	// only. Default "127.0.0.1:0", which reuses the port of the last run
	// when it can. When another process serves this directory's metadata
	// service on that port, it is shared, not listened on (see metadata.go).
	MetadataAddr string
	// Region names the region: "" or "local" is the tree in Dir itself, any
	// other name a tree of its own under Dir/regions. Regions share nothing
	// but Dir, where CopySnapshot finds the other regions.
	Region string
	// Logger gets the provider's logs; nil discards them.
	Logger *slog.Logger
}

// defaultRegion is the region whose tree is Options.Dir itself, as it was
// before there were regions.
const defaultRegion = "local"

var regionRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// regionDir returns the tree of region under root.
func regionDir(root, region string) (string, error) {
	if !regionRE.MatchString(region) {
		return "", fmt.Errorf("invalid region %q: use 1 to 63 lower-case letters, digits or '-', starting with a letter or digit", region)
	}
	if region == defaultRegion {
		return root, nil
	}
	return filepath.Join(root, "regions", region), nil
}

const (
	defaultZone = "local-1a"
	defaultType = "local"
	// consoleTail is how much ConsoleOutput returns, as EC2 does.
	consoleTail = 64 << 10
	// stopGrace is how long processes get between SIGTERM and SIGKILL.
	stopGrace = 5 * time.Second
)

// Provider is a local cloud. It is safe for concurrent use.
type Provider struct {
	opts   Options // Dir is the root of every region
	region string
	log    *slog.Logger
	store  *store
	bash   string
	path   string // PATH given to instances
	md     metadataService
	now    func() time.Time // replaced by tests

	mu     sync.Mutex
	keys   map[string]string // metadata key → instance id, a cache
	lastGC time.Time
	// identityKey and identityCert are the tree's, once read (identity.go),
	// under identityMu: not mu, which every metadata request takes and a
	// key's generation would hold for a while.
	identityMu   sync.Mutex
	identityKey  *rsa.PrivateKey
	identityCert []byte
}

var _ cloud.Provider = (*Provider)(nil)

// New opens (or creates) the local cloud in opts.Dir and starts its metadata
// service.
func New(ctx context.Context, opts Options) (*Provider, error) {
	return newProvider(ctx, opts, time.Now)
}

// newProvider is New with a clock that tests can replace.
func newProvider(ctx context.Context, opts Options, now func() time.Time) (*Provider, error) {
	if opts.Dir == "" {
		return nil, errors.New("starting local cloud: no directory given")
	}
	if opts.BootDelay < 0 {
		return nil, fmt.Errorf("starting local cloud: negative boot delay %s", opts.BootDelay)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		return nil, fmt.Errorf("starting local cloud: %w", err)
	}
	// Instances get paths under Dir as cwd and HOME, so it must not depend
	// on the server's working directory.
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("starting local cloud: %w", err)
	}
	opts.Dir = dir
	region := opts.Region
	if region == "" {
		region = defaultRegion
	}
	tree, err := regionDir(dir, region)
	if err != nil {
		return nil, fmt.Errorf("starting local cloud: %w", err)
	}
	log = log.With("region", region)
	st, err := openStore(tree, log)
	if err != nil {
		return nil, fmt.Errorf("starting local cloud: %w", err)
	}
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/bin:/usr/bin:/bin"
	}
	p := &Provider{
		opts:   opts,
		region: region,
		log:    log,
		store:  st,
		bash:   bash,
		path:   path,
		now:    now,
		keys:   map[string]string{},
	}
	p.md.srv = &http.Server{
		Handler:           http.HandlerFunc(p.serveMetadata),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	if err := p.openMetadata(ctx, opts.MetadataAddr); err != nil {
		return nil, fmt.Errorf("starting local cloud: %w", err)
	}
	log.Info("local cloud ready", "dir", tree, "metadata", p.MetadataURL(), "metadata_served_here", p.ownsMetadata())
	return p, nil
}

// MetadataURL is the base URL of the metadata service, which this process or
// another on the same directory serves. Each instance's own base is this
// plus "/" and its metadata key.
func (p *Provider) MetadataURL() string {
	p.md.mu.Lock()
	defer p.md.mu.Unlock()
	return "http://" + p.md.addr
}

// Capabilities: the local cloud can stop and start, and keeps a console log.
// Instances launched with a key pair run sshd on port 2222 of their address
// (22 would need root, and the host's own sshd may hold it).
func (p *Provider) Capabilities() cloud.Capabilities {
	return cloud.Capabilities{StopStart: true, ConsoleOutput: true, SSHPort: sshPort}
}

// Region names the provider's region ("local" unless Options.Region says
// otherwise).
func (p *Provider) Region() string { return p.region }

// Close stops the metadata service, if this process serves it; another
// process on the same directory then takes it over. Instances keep running.
func (p *Provider) Close() error {
	if err := p.closeMetadata(); err != nil {
		return fmt.Errorf("closing local cloud: %w", err)
	}
	return nil
}

// Launch starts n instances, each a new process session running spec's
// user-data after the boot delay.
func (p *Provider) Launch(ctx context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	if spec.ClientToken == "" {
		return nil, errors.New("launching local instances: a client token is required")
	}
	// EC2's limit, so that a pool developed against the local cloud works there.
	if len(spec.ClientToken) > 64 {
		return nil, errors.New("launching local instances: client token longer than 64 characters")
	}
	if n < 1 {
		return nil, fmt.Errorf("launching local instances: count %d is not positive", n)
	}
	steps, err := bootSteps(spec.UserData)
	if err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	}
	if spec.KeyName != "" {
		if err := validKeyName(spec.KeyName); err != nil {
			return nil, fmt.Errorf("launching local instances: %w", err)
		}
		if err := checkSSHD(); err != nil {
			return nil, fmt.Errorf("launching local instances with key pair %q: %w", spec.KeyName, err)
		}
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	}
	defer unlock()
	now := p.now()
	p.gcIfDue(now)

	if ids, ok, err := p.store.tokenIDs(spec.ClientToken); err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	} else if ok {
		return p.instances(ids, now), nil
	}

	src, err := p.launchSource(spec)
	if err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	}
	if err := p.ensureMetadata(ctx); err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	}
	recs, err := p.store.records(now, 0)
	if err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	}
	usedIPs := map[string]bool{}
	for _, r := range recs {
		usedIPs[r.PrivateIP] = true
	}
	planned := make([]*record, n)
	ids := make([]string, n)
	for i := range planned {
		planned[i] = p.newRecord(spec, src, now, usedIPs)
		// In the record, so that a replay after a partial launch (whose
		// token then lists fewer ids) gives each the same index.
		planned[i].LaunchIndex = i
		ids[i] = planned[i].ID
	}
	// Written before any instance exists, so that a retry after a crash here
	// cannot launch a second set.
	if err := p.store.putToken(spec.ClientToken, ids); err != nil {
		return nil, fmt.Errorf("launching local instances: %w", err)
	}

	var out []cloud.Instance
	var errs []error
	for _, r := range planned {
		if err := p.create(ctx, r, spec.UserData, steps, src); err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, r.instance(now))
		p.log.Info("launched local instance", "id", r.ID, "ip", r.PrivateIP)
	}
	if len(out) < n {
		ok := make([]string, len(out))
		for i, inst := range out {
			ok[i] = inst.ID
		}
		errs = append(errs, p.store.putToken(spec.ClientToken, ok))
	}
	if err := errors.Join(errs...); err != nil {
		return out, fmt.Errorf("launching local instances: %w", err)
	}
	return out, nil
}

// defaultRootGB is the root disk size instances report when neither the
// image nor the launch gives one (EC2's usual default).
const defaultRootGB = 8

// launchSrc is what a launch starts its instances from, beyond the spec.
type launchSrc struct {
	// rootData is the directory the disk starts as a copy of; "" is empty.
	rootData string
	rootGB   int
	// authorizedKey is the key pair's key, when the spec names one.
	authorizedKey []byte
}

// launchSource finds spec's key pair and image. The caller holds the lock,
// so neither can be deleted before the instances are made.
func (p *Provider) launchSource(spec cloud.LaunchSpec) (launchSrc, error) {
	var src launchSrc
	if spec.KeyName != "" {
		key, err := os.ReadFile(p.store.keyPairPath(spec.KeyName))
		if errors.Is(err, fs.ErrNotExist) {
			return src, fmt.Errorf("key pair %q: %w", spec.KeyName, cloud.ErrNotFound)
		}
		if err != nil {
			return src, fmt.Errorf("reading key pair %q: %w", spec.KeyName, err)
		}
		src.authorizedKey = key
	}
	// Only ids shaped like this cloud's image ids (ami- and 17 hex digits)
	// name an image; other strings ("local", "ami-0123") are labels, as
	// before there were images.
	if validResourceID("ami", spec.Image) {
		img, err := p.store.getImage(spec.Image)
		if err != nil {
			return src, err
		}
		root, ok := img.rootDevice()
		if !ok {
			return src, fmt.Errorf("image %s has no root device %s", img.ID, img.RootDevice)
		}
		snap, err := p.store.getSnapshot(root.SnapshotID)
		if err != nil {
			return src, fmt.Errorf("root snapshot of image %s: %w", img.ID, err)
		}
		if snap.Raw {
			return src, fmt.Errorf("image %s: its root snapshot %s is a raw disk image; local instances boot from directory snapshots only", img.ID, snap.ID)
		}
		src.rootData = p.store.snapshotData(snap)
		src.rootGB = max(root.SizeGB, snap.SizeGB)
	}
	if spec.RootVolumeGB > src.rootGB {
		src.rootGB = spec.RootVolumeGB
	}
	if src.rootGB == 0 {
		src.rootGB = defaultRootGB
	}
	return src, nil
}

func (p *Provider) newRecord(spec cloud.LaunchSpec, src launchSrc, now time.Time, usedIPs map[string]bool) *record {
	id := newID()
	for p.store.exists(id) {
		id = newID()
	}
	ip := newLoopbackIP()
	for usedIPs[ip] {
		ip = newLoopbackIP()
	}
	usedIPs[ip] = true
	r := &record{
		ID:          id,
		State:       cloud.StateRunning,
		Type:        defaultType,
		Zone:        defaultZone,
		Image:       spec.Image,
		Tags:        map[string]string{},
		LaunchedAt:  now,
		BootAt:      now.Add(p.opts.BootDelay),
		PrivateIP:   ip,
		ClientToken: spec.ClientToken,
		MetadataKey: randHex(16),
		KeyName:     spec.KeyName,
		RootGB:      src.rootGB,
	}
	if len(spec.InstanceTypes) > 0 {
		r.Type = spec.InstanceTypes[0]
	}
	if len(spec.Zones) > 0 {
		r.Zone = spec.Zones[0]
	}
	for k, v := range spec.Tags {
		r.Tags[k] = v
	}
	return r
}

// newLoopbackIP picks an address in 127.1.0.1–127.254.255.254, clear of
// 127.0.0.0/16 where the host's own services live (127.0.0.1, 127.0.1.1,
// 127.0.0.53).
func newLoopbackIP() string {
	b := make([]byte, 3)
	rand.Read(b)
	return fmt.Sprintf("127.%d.%d.%d", 1+int(b[0])%254, b[1], 1+int(b[2])%254)
}

// create lays out the instance's directory and boots it. The record is saved
// before the boot so that a crash cannot leave processes nobody lists.
func (p *Provider) create(ctx context.Context, r *record, userData []byte, steps []bootStep, src launchSrc) error {
	dir := p.store.instanceDir(r.ID)
	err := func() error {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		disk := filepath.Join(dir, "disk")
		if src.rootData != "" {
			if err := copyData(ctx, src.rootData, disk, false); err != nil {
				return fmt.Errorf("copying the image's root disk: %w", err)
			}
		} else if err := os.Mkdir(disk, 0o700); err != nil {
			return err
		}
		if r.KeyName != "" {
			if err := writeSSHFiles(dir, r, src.authorizedKey); err != nil {
				return err
			}
		}
		if err := os.Mkdir(filepath.Join(dir, "parts"), 0o700); err != nil {
			return err
		}
		if err := writeFile(filepath.Join(dir, "user-data"), userData, 0o600); err != nil {
			return err
		}
		for i, s := range steps {
			name := fmt.Sprintf("%03d.txt", i+1)
			if s.script {
				name = fmt.Sprintf("%03d.sh", i+1)
			}
			if err := writeFile(filepath.Join(dir, "parts", name), s.body, 0o600); err != nil {
				return err
			}
		}
		if err := p.store.putRecord(r); err != nil {
			return err
		}
		if err := p.boot(r, p.opts.BootDelay); err != nil {
			return err
		}
		return p.store.putRecord(r)
	}()
	if err != nil {
		// Clean up even when the caller gave up: that may be why create failed.
		endProcesses(context.WithoutCancel(ctx), []*record{r}, 0)
		_ = os.RemoveAll(dir)
		return fmt.Errorf("creating instance %s: %w", r.ID, err)
	}
	return nil
}

// instances returns what is known of ids; ids long gone are left out.
func (p *Provider) instances(ids []string, now time.Time) []cloud.Instance {
	var out []cloud.Instance
	for _, id := range ids {
		if r, err := p.store.getRecord(id); err == nil {
			out = append(out, r.instance(now))
		}
	}
	return out
}

func (p *Provider) gcIfDue(now time.Time) {
	p.mu.Lock()
	due := now.Sub(p.lastGC) > gcEvery
	if due {
		p.lastGC = now
	}
	p.mu.Unlock()
	if due {
		if err := p.store.gc(now); err != nil {
			p.log.Warn("local cloud clean-up", "err", err)
		}
	}
}

// List returns the instances whose tags include tags, terminated ones for an
// hour after their end.
func (p *Provider) List(ctx context.Context, tags map[string]string) ([]cloud.Instance, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("listing local instances: %w", err)
	}
	now := p.now()
	recs, err := p.store.records(now, tombstoneListed)
	if err != nil {
		return nil, err
	}
	var out []cloud.Instance
	for _, r := range recs {
		if cloud.MatchesTags(r.Tags, tags) {
			out = append(out, r.instance(now))
		}
	}
	slices.SortFunc(out, func(a, b cloud.Instance) int {
		if c := a.LaunchedAt.Compare(b.LaunchedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Terminate ends every process of the instances and removes their disks.
func (p *Provider) Terminate(ctx context.Context, ids []string) ([]string, error) {
	return p.halt(ctx, ids, true)
}

// Stop ends every process of the instances and keeps their disks.
func (p *Provider) Stop(ctx context.Context, ids []string) ([]string, error) {
	return p.halt(ctx, ids, false)
}

// halt stops or terminates. Processes are ended outside the lock, which is
// only held to move each instance to stopping/terminating and then on to
// stopped/terminated; an instance left stopping or terminating by a crash is
// finished by the next call.
func (p *Provider) halt(ctx context.Context, ids []string, terminate bool) ([]string, error) {
	verb, transient, final := "stopping", cloud.StateStopping, cloud.StateStopped
	if terminate {
		verb, transient, final = "terminating", cloud.StateTerminating, cloud.StateTerminated
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s local instances: %w", verb, err)
	}
	var done, trash []string
	var errs []error
	var todo []*record
	for _, id := range ids {
		r, err := p.store.getRecord(id)
		if errors.Is(err, fs.ErrNotExist) {
			if terminate {
				done = append(done, id)
			} else {
				errs = append(errs, fmt.Errorf("%s %s: %w", verb, id, cloud.ErrNotFound))
			}
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", verb, id, err))
			continue
		}
		switch {
		case r.State == final && terminate:
			// A crash between tombstone and removal leaves the disk
			// behind (its processes had ended before the tombstone).
			if t, err := p.store.discardLeftover(id, p.now()); err != nil {
				errs = append(errs, fmt.Errorf("%s %s: removing its disk: %w", verb, id, err))
				continue
			} else if t != "" {
				trash = append(trash, t)
			}
			done = append(done, id)
			continue
		case r.State == final:
			done = append(done, id)
			continue
		case r.State == cloud.StateTerminated, r.State == cloud.StateTerminating && !terminate:
			errs = append(errs, fmt.Errorf("%s %s: instance is %s", verb, id, r.State))
			continue
		case r.State == transient:
			// Left so by a call that crashed, or still under way in
			// another process: end what is left either way.
			p.log.Info("finishing interrupted "+strings.TrimSuffix(verb, "ing")+" of local instance",
				"id", id, "since", r.HaltingSince)
		default:
			r.State, r.HaltingSince = transient, p.now()
			if err := p.store.putRecord(r); err != nil {
				errs = append(errs, fmt.Errorf("%s %s: %w", verb, id, err))
				continue
			}
		}
		todo = append(todo, r)
	}
	unlock()
	if len(todo) == 0 {
		removeTrash(p.log, trash)
		return done, errors.Join(errs...)
	}

	survivors := endProcesses(ctx, todo, stopGrace)

	// The processes are gone; finish even if ctx has ended meanwhile.
	unlock, err = p.store.lock(context.WithoutCancel(ctx))
	if err != nil {
		return done, errors.Join(append(errs, fmt.Errorf("%s local instances: %w", verb, err))...)
	}
	now := p.now()
	for _, r := range todo {
		if n := survivors[r.ID]; n > 0 {
			errs = append(errs, fmt.Errorf("%s %s: %d processes survived SIGKILL", verb, r.ID, n))
			continue
		}
		// Another process may have moved it on meanwhile.
		cur, err := p.store.getRecord(r.ID)
		switch {
		case errors.Is(err, fs.ErrNotExist) && terminate:
		case err != nil:
			errs = append(errs, fmt.Errorf("%s %s: %w", verb, r.ID, err))
			continue
		case cur.State == final:
		case cur.State != transient:
			errs = append(errs, fmt.Errorf("%s %s: instance became %s meanwhile", verb, r.ID, cur.State))
			continue
		case terminate:
			t, err := p.store.bury(cur, now)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s %s: %w", verb, r.ID, err))
				continue
			}
			trash = append(trash, t)
		default:
			cur.State, cur.HaltingSince = final, time.Time{}
			cur.PGID, cur.LeaderStart = 0, 0
			if err := p.store.putRecord(cur); err != nil {
				errs = append(errs, fmt.Errorf("%s %s: %w", verb, r.ID, err))
				continue
			}
		}
		done = append(done, r.ID)
		p.log.Info("local instance ended", "id", r.ID, "state", final)
	}
	unlock()
	removeTrash(p.log, trash)
	return done, errors.Join(errs...)
}

// removeTrash removes the disks of terminated instances, moved to the trash
// under the lock, without it.
func removeTrash(log *slog.Logger, trash []string) {
	for _, t := range trash {
		if err := os.RemoveAll(t); err != nil {
			log.Warn("removing disk of terminated instance", "path", t, "err", err)
		}
	}
}

// Start boots stopped instances again: their user-data runs once more, after
// the boot delay.
func (p *Provider) Start(ctx context.Context, ids []string) ([]string, error) {
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return nil, fmt.Errorf("starting local instances: %w", err)
	}
	defer unlock()
	if err := p.ensureMetadata(ctx); err != nil {
		return nil, fmt.Errorf("starting local instances: %w", err)
	}
	var done []string
	var errs []error
	for _, id := range ids {
		r, err := p.store.getRecord(id)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			errs = append(errs, fmt.Errorf("starting %s: %w", id, cloud.ErrNotFound))
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("starting %s: %w", id, err))
			continue
		case r.State == cloud.StateRunning:
			done = append(done, id)
			continue
		case r.State != cloud.StateStopped:
			errs = append(errs, fmt.Errorf("starting %s: instance is %s", id, r.State))
			continue
		}
		// Like EC2, a start is a new launch time.
		now := p.now()
		r.State, r.LaunchedAt, r.BootAt = cloud.StateRunning, now, now.Add(p.opts.BootDelay)
		if err := p.store.putRecord(r); err != nil {
			errs = append(errs, fmt.Errorf("starting %s: %w", id, err))
			continue
		}
		if err := p.boot(r, p.opts.BootDelay); err != nil {
			errs = append(errs, err)
			r.State = cloud.StateStopped
			if err := p.store.putRecord(r); err != nil {
				errs = append(errs, fmt.Errorf("starting %s: %w", id, err))
			}
			continue
		}
		if err := p.store.putRecord(r); err != nil {
			errs = append(errs, fmt.Errorf("starting %s: %w", id, err))
			continue
		}
		done = append(done, id)
		p.log.Info("started local instance", "id", id)
	}
	return done, errors.Join(errs...)
}

// ConsoleOutput returns the last 64 KiB the instance's user-data printed.
// A terminated instance has none.
func (p *Provider) ConsoleOutput(ctx context.Context, id string) ([]byte, error) {
	r, err := p.store.getRecord(id)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("reading console of %s: %w", id, cloud.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("reading console of %s: %w", id, err)
	}
	if r.State == cloud.StateTerminated {
		return nil, nil
	}
	f, err := os.Open(filepath.Join(p.store.instanceDir(id), "console.log"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // terminated meanwhile
	}
	if err != nil {
		return nil, fmt.Errorf("reading console of %s: %w", id, err)
	}
	defer func() { _ = f.Close() }()
	if fi, err := f.Stat(); err == nil && fi.Size() > consoleTail {
		if _, err := f.Seek(fi.Size()-consoleTail, io.SeekStart); err != nil {
			return nil, fmt.Errorf("reading console of %s: %w", id, err)
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, consoleTail))
	if err != nil {
		return nil, fmt.Errorf("reading console of %s: %w", id, err)
	}
	return b, nil
}
