// Package configs loads Hangar's TOML configuration.
//
// The order is Default(), then the file decoded over it, then per-provider
// and per-pool defaults and derived values, then Validate. Loading reports
// every problem of a file at once (unknown keys, wrong types, unparsable
// durations and semantic errors), each naming the file, the line and the key:
//
//	hangar.toml:12: pools.demo.max_instances: must be ≥ min_idle (5)
//
// A problem about a key that the file does not set (a default) has no line.
package configs

import (
	_ "embed"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/scripts"
)

// embeddedName stands in for a file name in messages about the embedded
// default, so that users are not sent looking for a file they do not have.
const embeddedName = "local.toml (embedded)"

//go:embed local.toml
var localTOML []byte

// Duration is a time.Duration written in TOML as a string such as "90s" or
// "5m": TOML has no duration type and bare integers hide their unit.
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := time.ParseDuration(string(text))
	if err != nil {
		return fmt.Errorf("invalid duration %q: use a number and a unit, e.g. \"90s\", \"5m\", \"1h\"", text)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration in the form UnmarshalText reads.
func (d Duration) MarshalText() ([]byte, error) { return []byte(short(d.Duration)), nil }

// Config is a whole Hangar configuration.
type Config struct {
	Server    Server              `toml:"server"`
	Providers map[string]Provider `toml:"providers"`
	Pools     map[string]Pool     `toml:"pools"`

	// Path is the file the config was loaded from; "" for the embedded default.
	Path string `toml:"-"`

	src *source // where each key was written, for messages; nil when built in code
}

// Server configures the HTTP server and the reconciler.
type Server struct {
	Listen string `toml:"listen"`
	// PublicURL is how instances reach the bootstrap endpoints. Load derives
	// it from Listen when the file leaves it empty.
	PublicURL string `toml:"public_url"`
	// DataDir holds the store and the local cloud's instances. A relative
	// path is relative to the config file's directory, as every path in a
	// config is, so that every command given the same file finds the same
	// state wherever it runs; the embedded default, which has no file, keeps
	// its .hangar in the working directory.
	DataDir string `toml:"data_dir"`
	// OldDataDir is where a relative data_dir was before it was relative
	// to the config file (the working directory's), when that is another
	// place: serve refuses to start afresh beside a store left there.
	OldDataDir        string   `toml:"-"`
	Tokens            []Token  `toml:"tokens"`
	ReconcileInterval Duration `toml:"reconcile_interval"`
	// OrphanGrace is how long an instance tagged as ours but unknown to the
	// store lives before it is terminated: long enough for a launch whose
	// intent is being written to show up in the store.
	OrphanGrace Duration `toml:"orphan_grace"`
	// MetricsPublic serves /metrics without a bearer token even when
	// tokens are configured; otherwise it takes a token of any role.
	MetricsPublic bool `toml:"metrics_public"`
	// InsecureHTTP accepts an http:// public_url to a non-loopback host,
	// over which bootstrap tokens and worker passwords travel in clear.
	InsecureHTTP bool `toml:"insecure_http"`
	// TLSCert and TLSKey, both or neither, are PEM files (resolved against
	// the config file's directory) with which serve listens with TLS; the
	// derived public_url is then https://.
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
}

// MinTokenSecret is the least length, in bytes, of an API token's secret.
const MinTokenSecret = 16

// Token is an API bearer token. Exactly one of TokenEnv, TokenFile and Token
// says where its secret is.
type Token struct {
	Name      string `toml:"name"`
	Role      string `toml:"role"` // "lease" | "admin"
	TokenEnv  string `toml:"token_env"`
	TokenFile string `toml:"token_file"` // resolved against the config file's directory
	Token     string `toml:"token"`
}

// Secret resolves the token's secret. Errors never contain it.
func (t Token) Secret() (string, error) {
	s, err := t.resolve()
	if err != nil {
		return "", fmt.Errorf("token %q: %w", t.Name, err)
	}
	return s, nil
}

// source names the key that says where the secret is.
func (t Token) source() string {
	switch {
	case t.TokenEnv != "":
		return "token_env"
	case t.TokenFile != "":
		return "token_file"
	default:
		return "token"
	}
}

// resolve is Secret without the token's name in errors, for messages that
// already name its key.
func (t Token) resolve() (string, error) {
	var s string
	switch {
	case t.TokenEnv != "":
		s = os.Getenv(t.TokenEnv)
		if s == "" {
			return "", fmt.Errorf("environment variable %s is not set or empty", t.TokenEnv)
		}
	case t.TokenFile != "":
		b, err := os.ReadFile(t.TokenFile)
		if err != nil {
			// The os error names the path and the cause, never the content.
			return "", fmt.Errorf("reading token_file: %w", err)
		}
		s = strings.TrimRight(string(b), "\r\n")
		if s == "" {
			return "", fmt.Errorf("token_file %s is empty", t.TokenFile)
		}
	case t.Token != "":
		s = t.Token
	default:
		return "", errors.New("none of token_env, token_file or token is set")
	}
	return s, nil
}

// String keeps a literal secret out of logs and %v output.
func (t Token) String() string {
	from := "token"
	switch {
	case t.TokenEnv != "":
		from = "env " + t.TokenEnv
	case t.TokenFile != "":
		from = "file " + t.TokenFile
	}
	return fmt.Sprintf("token %q (role %s, from %s)", t.Name, t.Role, from)
}

// Provider is a cloud that pools launch instances on.
type Provider struct {
	Type string `toml:"type"` // "local" | "ec2"

	// local
	BootDelay Duration `toml:"boot_delay"` // emulates a cloud's boot latency

	// ec2
	Region   string `toml:"region"`
	Endpoint string `toml:"endpoint"` // EC2-compatible clouds; "" for AWS
	Profile  string `toml:"profile"`
	// CapacityRetry is how long a (type, zone, market) offering that failed
	// for lack of capacity is skipped before it is tried again.
	CapacityRetry Duration `toml:"capacity_retry"`
	// SSHPort is the port instances' sshd listens on (0 = 22).
	SSHPort int `toml:"ssh_port"`

	// Staging says how `hangar staging` launches and reaches its servers.
	Staging Staging `toml:"staging"`
}

// Staging configures the staging engine's servers on one provider. Empty
// image, instance_type and user take the provider type's defaults (see
// StagingDefaults).
type Staging struct {
	Image          string   `toml:"image"`
	InstanceType   string   `toml:"instance_type"`
	Zone           string   `toml:"zone"`
	User           string   `toml:"user"` // ssh login; must be root or have passwordless sudo
	Subnets        []string `toml:"subnets"`
	SecurityGroups []string `toml:"security_groups"` // must let this machine reach port 22
	OnExit         string   `toml:"on_exit"`         // "stop" | "terminate" | "run"
	ReadyTimeout   Duration `toml:"ready_timeout"`   // launch → ssh works
}

// StagingDefaults fills what s leaves empty for a provider of type typ:
// Debian's official image and its "admin" user on EC2; on the local cloud,
// whose servers are this machine, the user running Hangar.
func (s Staging) StagingDefaults(typ, currentUser string) Staging {
	if typ == "ec2" {
		if s.Image == "" {
			s.Image = "136693071363:debian-12-amd64-*" // Debian's own AWS account
		}
		if s.InstanceType == "" {
			s.InstanceType = "t3.small"
		}
		if s.User == "" {
			s.User = "admin"
		}
	}
	if s.Image == "" {
		s.Image = "local"
	}
	if s.User == "" {
		s.User = currentUser
	}
	return s
}

// MetadataOptions are the EC2 instance metadata settings. The defaults
// (IMDSv2 required, hop limit 1) keep containers on the instance away from
// its credentials; clouds without IMDSv2 can switch them off.
type MetadataOptions struct {
	HTTPTokens string `toml:"http_tokens"` // "required" | "optional"
	HopLimit   int    `toml:"hop_limit"`
}

// Pool is a set of like instances handed out by leases.
type Pool struct {
	Provider      string   `toml:"provider"`
	Image         string   `toml:"image"`
	InstanceTypes []string `toml:"instance_types"` // ordered fallback
	Zones         []string `toml:"zones"`          // ordered fallback

	// ec2
	Subnets            []string        `toml:"subnets"`
	SecurityGroups     []string        `toml:"security_groups"`
	KeyName            string          `toml:"key_name"`
	IAMInstanceProfile string          `toml:"iam_instance_profile"`
	RootVolumeGB       int             `toml:"root_volume_gb"` // 0: the image's size
	Spot               string          `toml:"spot"`           // "off" | "prefer" | "only"
	MetadataOptions    MetadataOptions `toml:"metadata_options"`

	MinIdle      MinIdle  `toml:"min_idle"`
	MaxInstances int      `toml:"max_instances"`
	IdleTTD      Duration `toml:"idle_ttd"`
	BootTimeout  Duration `toml:"boot_timeout"`
	LeaseTTL     Duration `toml:"lease_ttl"`     // when the client asks for none
	MaxLeaseTTL  Duration `toml:"max_lease_ttl"` // the most a client may ask for
	MaxUses      int      `toml:"max_uses"`      // 0: unlimited
	OnIdle       string   `toml:"on_idle"`       // "terminate" | "stop"
	// LaunchBatch is how many instances one launch call may start, all
	// booting with one user-data that holds a batch enrollment token
	// (1..1000, default DefaultLaunchBatch; 1 gives each instance its own
	// call and token). A batch's instances enroll through the bootstrap
	// (builtin:generic.sh), so a bootstrap of one's own that does not
	// include it needs launch_batch = 1.
	LaunchBatch int `toml:"launch_batch"`
	// Identity is "signed" when an instance of a batch enrolls only with
	// its cloud's signed instance identity document, checked against
	// IdentityCertificate (a PEM file; a local provider's own certificate
	// by default) and, when set, IdentityAccount; "none" (the default):
	// its instance id is enough.
	Identity            string `toml:"identity"`
	IdentityCertificate string `toml:"identity_certificate"`
	IdentityAccount     string `toml:"identity_account"`

	// Bootstrap is "builtin:NAME", a file path (resolved against the config
	// file's directory) or an https:// URL.
	Bootstrap      string `toml:"bootstrap"`
	WorkerCommand  string `toml:"worker_command"`  // run by the bootstrap on assignment
	CleanupCommand string `toml:"cleanup_command"` // run by the bootstrap on release
	UserDataFormat string `toml:"userdata_format"` // "script" | "cloud-config" | "mime"
	CloudConfig    string `toml:"cloud_config"`    // the user's own #cloud-config, mime only

	// WorkerUser is the user the worker and a run's command run as (the
	// bootstrap must then run as root); "" is the bootstrap's own user.
	WorkerUser string `toml:"worker_user"`
	// ClaimTimeout is how long a lease may stay active while its holder
	// has not been told of it (its request was cut off by a timeout or a
	// crash and not repeated) before it is released, rather than hold its
	// instance for the whole lease_ttl.
	ClaimTimeout Duration `toml:"claim_timeout"`

	Env  map[string]string `toml:"env"`
	Tags map[string]string `toml:"tags"` // extra cloud tags

	// Jenkins makes `hangar jenkins` watch a controller's build queue for
	// this pool (see jenkins.go); the zero value watches nothing.
	Jenkins Jenkins `toml:"jenkins"`

	// Cache, when the file has a [pools.NAME.cache] table, gives each
	// instance a build cache volume (pool/cache.go).
	Cache *Cache `toml:"cache"`

	// Bake, when the file has a [pools.NAME.bake] table, lets `hangar image
	// bake` make images for this pool, which it then launches from.
	Bake *Bake `toml:"bake"`

	// Autoscale is the [pools.NAME.autoscale] table of a pool with
	// min_idle = "auto" (each needs the other).
	Autoscale *Autoscale `toml:"autoscale"`
}

// MinIdle is a pool's min_idle: a number of warm spares, or "auto" for a
// pool that sizes them itself from the demand it sees.
type MinIdle struct {
	N    int
	Auto bool
}

// decodeTOML takes an integer or the string "auto".
func (m *MinIdle) decodeTOML(v any) error {
	switch v := v.(type) {
	case int64:
		if v != int64(int(v)) {
			return fmt.Errorf("%d is out of range", v)
		}
		*m = MinIdle{N: int(v)}
	case string:
		if v != "auto" {
			return fmt.Errorf(`must be an integer or "auto", not %q`, v)
		}
		*m = MinIdle{Auto: true}
	default:
		return fmt.Errorf(`must be an integer or "auto", not %s`, tomlType(v))
	}
	return nil
}

// String is min_idle as the file writes it.
func (m MinIdle) String() string {
	if m.Auto {
		return `"auto"`
	}
	return strconv.Itoa(m.N)
}

// Autoscale is what a pool with min_idle = "auto" aims at.
type Autoscale struct {
	// TargetWaitP95 is the wait for an instance that at most 5% of lease
	// requests may exceed.
	TargetWaitP95 Duration `toml:"target_wait_p95"`
	// MaxIdle caps the spares; unset, it is max_instances up to
	// DefaultMaxIdle (MaxIdleOf).
	MaxIdle *int `toml:"max_idle"`
}

// DefaultMaxIdle is the most spares an autoscaled pool keeps when its
// max_idle is not set (and max_instances is higher).
const DefaultMaxIdle = 20

func (a *Autoscale) setDefaults() {
	a.TargetWaitP95 = Duration{5 * time.Second}
}

// MaxIdleOf is the pool's max_idle, set or defaulted.
func (p Pool) MaxIdleOf() int {
	if p.Autoscale != nil && p.Autoscale.MaxIdle != nil {
		return *p.Autoscale.MaxIdle
	}
	return min(DefaultMaxIdle, p.MaxInstances)
}

// Bake is how a pool's images are baked: Script runs as root on a staging
// server booted from the pool's image, and the server's disk becomes an
// image named hangar-POOL-YYYYMMDD-HHMMSS, tagged hangar:bake=POOL.
type Bake struct {
	// Script is a file, resolved against the config file's directory.
	Script string `toml:"script"`
	// Keep is how many baked images are kept (older ones no instance uses
	// are deleted after each bake).
	Keep int `toml:"keep"`
}

func (b *Bake) setDefaults() { b.Keep = 2 }

// ImageSource is a pool image that lives in another region: bake:POOL
// (that pool's newest baked image) or SPEC@REGION (an image id or name
// pattern, in REGION of the pool's provider). Hangar copies it to the
// pool's region and launches from the copy.
type ImageSource struct {
	Pool   string // bake:POOL
	Spec   string // SPEC@REGION
	Region string
}

// ParseImageSource reads a pool's image: a zero ImageSource for a plain
// image of the pool's own region.
func ParseImageSource(image string) (ImageSource, error) {
	if pool, ok := strings.CutPrefix(image, "bake:"); ok {
		if pool == "" {
			return ImageSource{}, errors.New("bake: needs a pool name (bake:POOL)")
		}
		return ImageSource{Pool: pool}, nil
	}
	spec, region, ok := strings.Cut(image, "@")
	switch {
	case !ok:
		return ImageSource{}, nil
	case spec == "" || region == "" || strings.Contains(region, "@"):
		return ImageSource{}, fmt.Errorf("%q: want ID_OR_NAME_PATTERN@REGION", image)
	}
	return ImageSource{Spec: spec, Region: region}, nil
}

// Cache is a pool's build cache on volumes: each instance gets its own,
// made from the newest snapshot, and an instance that served a lease is
// snapshotted as it ends.
type Cache struct {
	// Volume names the cache: its volumes and snapshots are tagged with
	// it (hangar:cache). Default: the pool's name.
	Volume string `toml:"volume"`
	SizeGB int    `toml:"size_gb"`
	// Mount is where the bootstrap mounts the volume before it reports
	// ready ($HANGAR_ROOT/… on the local cloud).
	Mount string `toml:"mount"`
	// Keep is how many snapshots are kept; older ones are deleted.
	Keep int `toml:"keep"`
	// Refresh is how old the newest snapshot may get while instances live
	// on: the most recently used idle instance's cache is snapshotted
	// this often. "0s": only when instances end.
	Refresh Duration `toml:"refresh"`
}

func (c *Cache) setDefaults() {
	c.SizeGB = 20
	c.Mount = "/cache"
	c.Keep = 3
	c.Refresh = Duration{6 * time.Hour}
}

// Default returns the server defaults; it has no providers and no pools.
func Default() Config {
	return Config{
		Server: Server{
			Listen:            "127.0.0.1:7878",
			PublicURL:         "http://127.0.0.1:7878",
			DataDir:           ".hangar",
			ReconcileInterval: Duration{10 * time.Second},
			OrphanGrace:       Duration{5 * time.Minute},
		},
	}
}

// setDefaults fills a provider before the file is decoded over it, so that a
// value the file sets, even a zero, is never replaced by a default.
func (p *Provider) setDefaults() {
	p.CapacityRetry = Duration{60 * time.Second}
	p.Staging.OnExit = "stop"
	p.Staging.ReadyTimeout = Duration{10 * time.Minute}
}

// setDefaults fills a pool before the file is decoded over it.
func (p *Pool) setDefaults() {
	p.Spot = "off"
	p.MetadataOptions = MetadataOptions{HTTPTokens: "required", HopLimit: 1}
	p.MaxInstances = 4
	p.IdleTTD = Duration{10 * time.Minute}
	p.BootTimeout = Duration{5 * time.Minute}
	p.LeaseTTL = Duration{time.Hour}
	p.MaxLeaseTTL = Duration{24 * time.Hour}
	p.OnIdle = "terminate"
	p.Bootstrap = "builtin:generic.sh"
	p.UserDataFormat = "script"
	p.ClaimTimeout = Duration{2 * time.Minute}
	// Batches of 50 start 500 instances in ten calls, within EC2's
	// request bucket (issue 14); 1 launches one instance per call.
	p.LaunchBatch = DefaultLaunchBatch
	p.Identity = "none"
}

// Load reads and validates the config file at path. It reads a token's
// secret only to check it, and skips that check when the secret is not
// there (an unset variable); ValidateServing and Check do not.
func Load(path string) (Config, error) {
	return load(path, false)
}

// Check is Load with every check that `hangar serve` makes before it
// serves: every token's secret must resolve, and the TLS files must exist
// and load as a pair. `hangar config check` uses it, so that it refuses
// what serve refuses, on the machine that serves.
func Check(path string) (Config, error) {
	return load(path, true)
}

func load(path string, serving bool) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading config: %w", err)
	}
	return parse(path, path, data, serving)
}

// Parse validates a config from bytes. name is used in messages and as
// Path, so relative paths in it resolve against name's directory.
func Parse(name string, data []byte) (Config, error) {
	return parse(name, name, data, false)
}

// LoadDefault returns the embedded configs/local.toml.
func LoadDefault() (Config, error) {
	return parse(embeddedName, "", localTOML, false)
}

func parse(name, path string, data []byte, serving bool) (Config, error) {
	c := Default()
	c.Server.PublicURL = "" // derived from the file's listen unless it sets its own
	c.Path = path
	c.src = &source{name: name}
	problems, err := c.src.decode(data, &c)
	if err != nil {
		return Config{}, err
	}
	c.derive()
	problems = append(problems, c.check(serving)...)
	if err := joinProblems(problems); err != nil {
		return Config{}, err
	}
	return c, nil
}

// derive fills values that depend on others and resolves relative paths.
func (c *Config) derive() {
	if c.Server.PublicURL == "" {
		c.Server.PublicURL = c.Server.Scheme() + "://" + c.Server.Listen
	}
	dir := "."
	if c.Path != "" {
		dir = filepath.Dir(c.Path)
	}
	if c.Path != "" {
		// The embedded default's .hangar stays relative: to where serve runs.
		rel := c.Server.DataDir
		c.Server.DataDir = resolve(dir, rel)
		if old, err := filepath.Abs(rel); err == nil && !filepath.IsAbs(rel) && old != c.Server.DataDir {
			c.Server.OldDataDir = old
		}
	}
	c.Server.TLSCert = resolve(dir, c.Server.TLSCert)
	c.Server.TLSKey = resolve(dir, c.Server.TLSKey)
	for i, t := range c.Server.Tokens {
		c.Server.Tokens[i].TokenFile = resolve(dir, t.TokenFile)
	}
	for name, p := range c.Pools {
		if !strings.HasPrefix(p.Bootstrap, "builtin:") && !strings.Contains(p.Bootstrap, "://") {
			p.Bootstrap = resolve(dir, p.Bootstrap)
		}
		if script, ok := strings.CutPrefix(p.Bootstrap, "builtin:"); ok && p.WorkerCommand == "" {
			// A built-in bootstrap made for one CI brings its worker command.
			p.WorkerCommand = scripts.DefaultWorkerCommand(script)
		} else if p.WorkerCommand == "" && !strings.Contains(p.Bootstrap, "://") {
			// So does a file, such as a copy of one (errors: validate's).
			b, _ := scripts.ExpandFile(p.Bootstrap)
			p.WorkerCommand = scripts.WorkerCommand(b)
		}
		if p.LaunchBatch > 1 && c.src != nil && c.src.lines[join(join("pools", name), "launch_batch")] == 0 && !bootstrapEnrolls(p.Bootstrap) {
			// The default batch is for bootstraps that enroll a batch's
			// instances; one that does not (or may not: a URL) gets its
			// instances one a call, each with its own token.
			p.LaunchBatch = 1
		}
		p.IdentityCertificate = resolve(dir, p.IdentityCertificate)
		p.deriveJenkins(dir)
		if p.Bake != nil {
			b := *p.Bake
			b.Script = resolve(dir, b.Script)
			p.Bake = &b
		}
		c.Pools[name] = p
	}
}

// resolve makes a relative path relative to dir, absolute so that it does
// not depend on the working directory later.
func resolve(dir, p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	p = filepath.Join(dir, p)
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	return joinProblems(c.check(false))
}

// ValidateServing is Validate with the checks that Check adds: `hangar
// serve` calls it, however its config was made.
func (c Config) ValidateServing() error {
	return joinProblems(c.check(true))
}

// Scheme is the scheme serve answers on: "https" with tls_cert and
// tls_key, else "http".
func (s Server) Scheme() string {
	if s.TLSCert != "" || s.TLSKey != "" {
		return "https"
	}
	return "http"
}
