package configs

import (
	"crypto/tls"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/internal/shell"
	"github.com/hangar-ci/hangar/scripts"
	"github.com/hangar-ci/hangar/userdata"
)

var (
	// nameRe keeps pool and provider names safe in tags, paths, metrics
	// labels and shell scripts without quoting surprises.
	nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	// userRe is a POSIX user name as useradd takes it by default.
	userRe = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
)

type checker struct {
	c        *Config
	problems []problem
	// serving adds the checks that read what serve reads: token secrets
	// that are not there, and the TLS files.
	serving bool
	// urlOK says server.public_url passed its checks, so that a pool's
	// user-data can be rendered with it.
	urlOK bool
}

// add reports a problem with key, at the key's line if the file sets it.
// A key that already failed to decode is not reported twice.
func (k *checker) add(key, format string, args ...any) {
	p := problem{key: key, msg: fmt.Sprintf(format, args...)}
	if k.bad(key) {
		return
	}
	if s := k.c.src; s != nil {
		p.file, p.line = s.name, s.lines[key]
	} else if p.file = k.c.Path; p.file == "" {
		p.file = embeddedName
	}
	k.problems = append(k.problems, p)
}

// bad reports whether key failed to decode.
func (k *checker) bad(key string) bool { return k.c.src != nil && k.c.src.bad[key] }

// pair reports a conflict between two keys on the one the file sets, so
// that the message points at a line when it can.
func (k *checker) pair(key, msg, otherKey, otherMsg string) {
	if s := k.c.src; s != nil && s.lines[key] == 0 && s.lines[otherKey] != 0 {
		k.add(otherKey, "%s", otherMsg)
		return
	}
	k.add(key, "%s", msg)
}

func (k *checker) oneOf(key, v string, allowed ...string) {
	if slices.Contains(allowed, v) {
		return
	}
	q := make([]string, len(allowed))
	for i, a := range allowed {
		q[i] = strconv.Quote(a)
	}
	k.add(key, "must be %s or %s, not %q", strings.Join(q[:len(q)-1], ", "), q[len(q)-1], v)
}

func (k *checker) positive(key string, d Duration) {
	if d.Duration <= 0 {
		k.add(key, "must be positive")
	}
}

func (k *checker) notNegative(key string, n int64) {
	if n < 0 {
		k.add(key, "must not be negative")
	}
}

// check finds every semantic problem; Validate and Load report them, and
// with serving set, ValidateServing and Check.
func (c Config) check(serving bool) []problem {
	k := &checker{c: &c, serving: serving}
	k.server(c.Server)
	for _, name := range slices.Sorted(maps.Keys(c.Providers)) {
		k.provider(name, c.Providers[name])
	}
	// Providers without pools is a config for `hangar staging`; serve
	// starts on it and warns.
	if len(c.Pools) == 0 && len(c.Providers) == 0 {
		k.add("pools", "no pools and no providers: nothing to serve or stage with")
	}
	for _, name := range slices.Sorted(maps.Keys(c.Pools)) {
		k.pool(name, c.Pools[name])
	}
	k.jenkinsPools(c.Pools)
	return k.problems
}

func (k *checker) server(s Server) {
	host, port, err := net.SplitHostPort(s.Listen)
	if _, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil {
		k.add("server.listen", "must be host:port, such as \"127.0.0.1:7878\", not %q", s.Listen)
	} else if len(s.Tokens) == 0 && !isLoopback(host) {
		k.add("server.listen", "refusing to serve without tokens on a non-loopback address")
	}
	k.publicURL(s)
	k.tls(s)
	if s.DataDir == "" {
		k.add("server.data_dir", "must not be empty")
	}
	k.positive("server.reconcile_interval", s.ReconcileInterval)
	k.notNegative("server.orphan_grace", int64(s.OrphanGrace.Duration))

	seen := map[string]string{}
	secrets := map[string]string{} // secret → the first token that has it
	for i, t := range s.Tokens {
		key := index("server.tokens", i)
		switch prev, dup := seen[t.Name]; {
		case t.Name == "":
			k.add(key, "name is required")
		case dup:
			k.add(join(key, "name"), "duplicate token name %q (also %s)", t.Name, prev)
		default:
			seen[t.Name] = key
		}
		if t.Role == "" {
			k.add(key, `role is required ("lease" or "admin")`)
		} else {
			k.oneOf(join(key, "role"), t.Role, "lease", "admin")
		}
		sources := 0
		for field, v := range map[string]string{"token_env": t.TokenEnv, "token_file": t.TokenFile, "token": t.Token} {
			// One that failed to decode was still meant as the source.
			if v != "" || k.bad(join(key, field)) {
				sources++
			}
		}
		switch {
		case sources == 0:
			k.add(key, "one of token_env, token_file or token is required")
		case sources > 1:
			k.add(key, "set only one of token_env, token_file or token")
		default:
			k.tokenSecret(key, t, secrets)
		}
	}
}

// tokenSecret checks a token's secret: long enough, and no other token's,
// as the API could not tell two such tokens apart (the later one won).
// Messages never show a secret, nor its length.
func (k *checker) tokenSecret(key string, t Token, secrets map[string]string) {
	key = join(key, t.source())
	if k.bad(key) {
		return
	}
	secret, err := t.resolve()
	if err != nil {
		// Load leaves to serve what is not there yet (a variable set only
		// for the service); Check and serve report it.
		if k.serving {
			k.add(key, "%v", err)
		}
		return
	}
	if len(secret) < MinTokenSecret {
		k.add(key, "the secret is shorter than %d bytes; use a random one, such as `openssl rand -hex 32` makes", MinTokenSecret)
	}
	if prev, dup := secrets[secret]; dup {
		k.add(key, "the same secret as %s: every token needs a secret of its own", prev)
	} else {
		secrets[secret] = strings.TrimSuffix(key, "."+t.source())
	}
}

// publicURL checks how instances reach Hangar, with the rules user-data
// rendering applies, so that a config serve would refuse fails here.
func (k *checker) publicURL(s Server) {
	const key = "server.public_url"
	u, err := url.Parse(s.PublicURL)
	show := s.PublicURL
	if err == nil {
		show = u.Redacted()
	}
	switch {
	case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		k.add(key, "must be an http:// or https:// URL, not %q", show)
		return
	case u.Hostname() == "" || net.ParseIP(u.Hostname()) != nil && net.ParseIP(u.Hostname()).IsUnspecified():
		// Derived from a listen address such as ":7878" or "0.0.0.0:7878".
		k.add(key, "must name a host instances can reach, not %q", show)
		return
	case u.User != nil:
		k.add(key, "must not carry a user or password")
		return
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(s.PublicURL, "#"):
		k.add(key, "must not have a query or fragment")
		return
	case strings.ContainsAny(s.PublicURL, " \t\r\n"):
		k.add(key, "must not contain white space")
		return
	}
	k.urlOK = true
	if u.Scheme != "http" {
		return
	}
	switch {
	case s.TLSCert != "" || s.TLSKey != "":
		k.add(key, "is http:// but the server listens with TLS (tls_cert, tls_key); use https://")
	case !isLoopback(u.Hostname()) && !s.InsecureHTTP:
		msg := "http:// to a non-loopback host would send bootstrap tokens and worker passwords across the network in clear: " +
			"set tls_cert and tls_key, or give an https:// URL of a TLS proxy, or set insecure_http = true to accept that"
		// A public_url derived from listen has no line of its own.
		k.pair(key, msg, "server.listen", msg)
	}
}

// tls checks tls_cert and tls_key: both or neither, and when serving, files
// that load as a pair. Messages never show the key's content.
func (k *checker) tls(s Server) {
	switch {
	case s.TLSCert == "" && s.TLSKey == "":
		return
	case s.TLSKey == "":
		k.add("server.tls_cert", "is set without tls_key; set both or neither")
		return
	case s.TLSCert == "":
		k.add("server.tls_key", "is set without tls_cert; set both or neither")
		return
	}
	if !k.serving {
		return
	}
	ok := true
	for key, path := range map[string]string{"server.tls_cert": s.TLSCert, "server.tls_key": s.TLSKey} {
		if fi, err := os.Stat(path); err != nil {
			k.add(key, "%v", err)
			ok = false
		} else if fi.IsDir() {
			k.add(key, "%s is a directory", path)
			ok = false
		}
	}
	if !ok {
		return
	}
	if _, err := tls.LoadX509KeyPair(s.TLSCert, s.TLSKey); err != nil {
		k.add("server.tls_cert", "does not load with tls_key as a key pair: %v", err)
	}
}

func (k *checker) provider(name string, p Provider) {
	key := join("providers", name)
	if !nameRe.MatchString(name) {
		k.add(key, "invalid name: must match %s", nameRe)
	}
	switch p.Type {
	case "":
		k.add(key, `type is required ("local" or "ec2")`)
	case "local":
	case "ec2":
		if p.Region == "" {
			k.add(key, `region is required for type "ec2"`)
		}
		if u, err := url.Parse(p.Endpoint); p.Endpoint != "" && (err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "") {
			k.add(join(key, "endpoint"), "must be an http:// or https:// URL, not %q", p.Endpoint)
		}
	default:
		k.oneOf(join(key, "type"), p.Type, "local", "ec2")
	}
	k.notNegative(join(key, "boot_delay"), int64(p.BootDelay.Duration))
	k.notNegative(join(key, "capacity_retry"), int64(p.CapacityRetry.Duration))
	if p.SSHPort < 0 || p.SSHPort > 65535 {
		k.add(join(key, "ssh_port"), "must be a port number, not %d", p.SSHPort)
	}
	// Empty staging values take the staging engine's defaults.
	st := join(key, "staging")
	if p.Staging.OnExit != "" {
		k.oneOf(join(st, "on_exit"), p.Staging.OnExit, "stop", "terminate", "run")
	}
	k.notNegative(join(st, "ready_timeout"), int64(p.Staging.ReadyTimeout.Duration))
}

func (k *checker) cache(key string, c Cache) {
	if c.Volume != "" && !nameRe.MatchString(c.Volume) {
		k.add(join(key, "volume"), "invalid name: must match %s", nameRe)
	}
	if c.SizeGB < 1 || c.SizeGB > 16384 {
		k.add(join(key, "size_gb"), "must be between 1 and 16384, not %d", c.SizeGB)
	}
	if !path.IsAbs(c.Mount) || path.Clean(c.Mount) != c.Mount || c.Mount == "/" {
		k.add(join(key, "mount"), "must be a clean absolute path other than /, not %q", c.Mount)
	}
	if c.Keep < 1 {
		k.add(join(key, "keep"), "must be ≥ 1: the newest snapshot is the one new instances start from")
	}
	k.notNegative(join(key, "refresh"), int64(c.Refresh.Duration))
}

func (k *checker) bake(key string, b Bake) {
	if b.Script == "" {
		k.add(key, "script is required: the script that bakes the image")
	} else if fi, err := os.Stat(b.Script); err != nil {
		k.add(join(key, "script"), "%v", err)
	} else if fi.IsDir() {
		k.add(join(key, "script"), "%s is a directory", b.Script)
	}
	if b.Keep < 1 {
		k.add(join(key, "keep"), "must be ≥ 1: the newest image is the one the pool launches from")
	}
}

// imageSource checks the forms of image that name an image in another
// region: bake:POOL (that pool's newest baked image) and SPEC@REGION.
func (k *checker) imageSource(key string, p Pool) {
	src, err := ParseImageSource(p.Image)
	switch {
	case err != nil:
		k.add(key, "%v", err)
	case src.Pool != "":
		other, ok := k.c.Pools[src.Pool]
		switch {
		case !ok:
			k.add(key, "bake:%s names no pool (defined: %s)", src.Pool, strings.Join(slices.Sorted(maps.Keys(k.c.Pools)), ", "))
		case other.Bake == nil:
			k.add(key, "bake:%s: pool %s has no [bake] table", src.Pool, src.Pool)
		case k.c.Providers[other.Provider].Type != k.c.Providers[p.Provider].Type:
			k.add(key, "bake:%s: pool %s is on a %s provider and this one on %s: images do not copy between them", src.Pool, src.Pool,
				k.c.Providers[other.Provider].Type, k.c.Providers[p.Provider].Type)
		}
	}
}

// MaxLaunchBatch is the most instances one launch call may start: EC2's
// instance bucket holds 1,000. DefaultLaunchBatch is launch_batch unset.
const (
	MaxLaunchBatch     = 1000
	DefaultLaunchBatch = 50
)

func (k *checker) pool(name string, p Pool) {
	key := join("pools", name)
	before := len(k.problems)
	defer func() {
		if len(k.problems) == before {
			k.renders(key, name, p)
		}
	}()
	f := func(field string) string { return join(key, field) }
	if !nameRe.MatchString(name) {
		k.add(key, "invalid name: must match %s", nameRe)
	}
	prov, ok := k.c.Providers[p.Provider]
	switch {
	case p.Provider == "":
		k.add(key, "provider is required")
	case !ok:
		k.add(f("provider"), "no provider named %q (defined: %s)", p.Provider, strings.Join(slices.Sorted(maps.Keys(k.c.Providers)), ", "))
	case prov.Type == "ec2":
		if p.Image == "" {
			k.add(key, "image is required for an ec2 provider")
		}
		if len(p.InstanceTypes) == 0 {
			k.add(key, "instance_types is required for an ec2 provider")
		}
	}
	k.oneOf(f("spot"), p.Spot, "off", "prefer", "only")
	k.oneOf(join(f("metadata_options"), "http_tokens"), p.MetadataOptions.HTTPTokens, "required", "optional")
	if h := p.MetadataOptions.HopLimit; h < 1 || h > 64 {
		k.add(join(f("metadata_options"), "hop_limit"), "must be between 1 and 64")
	}
	k.notNegative(f("root_volume_gb"), int64(p.RootVolumeGB))

	k.notNegative(f("min_idle"), int64(p.MinIdle.N))
	switch {
	case p.MaxInstances < 1:
		k.add(f("max_instances"), "must be ≥ 1")
	case p.MaxInstances < p.MinIdle.N:
		k.pair(f("max_instances"), fmt.Sprintf("must be ≥ min_idle (%d)", p.MinIdle.N),
			f("min_idle"), fmt.Sprintf("must be ≤ max_instances (%d)", p.MaxInstances))
	}
	k.autoscale(key, p)
	k.positive(f("idle_ttd"), p.IdleTTD)
	k.positive(f("boot_timeout"), p.BootTimeout)
	k.positive(f("lease_ttl"), p.LeaseTTL)
	k.positive(f("max_lease_ttl"), p.MaxLeaseTTL)
	if p.LeaseTTL.Duration > p.MaxLeaseTTL.Duration && p.MaxLeaseTTL.Duration > 0 {
		k.pair(f("lease_ttl"), fmt.Sprintf("must be ≤ max_lease_ttl (%s)", short(p.MaxLeaseTTL.Duration)),
			f("max_lease_ttl"), fmt.Sprintf("must be ≥ lease_ttl (%s)", short(p.LeaseTTL.Duration)))
	}
	k.notNegative(f("max_uses"), int64(p.MaxUses))
	if p.LaunchBatch < 1 || p.LaunchBatch > MaxLaunchBatch {
		k.add(f("launch_batch"), "must be between 1 and %d", MaxLaunchBatch)
	} else if p.LaunchBatch > 1 && !bootstrapEnrolls(p.Bootstrap) {
		k.add(f("launch_batch"), "the instances of a batch enroll through the bootstrap, and %s does not (include builtin:generic.sh in it, or set launch_batch = 1)", p.Bootstrap)
	}
	k.oneOf(f("on_idle"), p.OnIdle, "terminate", "stop")
	k.identity(key, p)
	if c := p.Cache; c != nil {
		k.cache(f("cache"), *c)
	}
	if b := p.Bake; b != nil {
		k.bake(f("bake"), *b)
	}
	k.imageSource(f("image"), p)

	k.bootstrap(f("bootstrap"), p.Bootstrap)
	k.oneOf(f("userdata_format"), p.UserDataFormat, "script", "cloud-config", "mime")
	if p.CloudConfig != "" {
		if p.UserDataFormat != "mime" {
			k.add(f("cloud_config"), `is only used with userdata_format = "mime"`)
		}
		if !strings.HasPrefix(p.CloudConfig, "#cloud-config") {
			k.add(f("cloud_config"), `must start with "#cloud-config"`)
		}
	}
	if p.WorkerUser != "" && !userRe.MatchString(p.WorkerUser) {
		k.add(f("worker_user"), "must be a POSIX user name matching %s, or empty for the bootstrap's own user", userRe)
	}
	k.positive(f("claim_timeout"), p.ClaimTimeout)
	for _, name := range slices.Sorted(maps.Keys(p.Env)) {
		// The one rule user-data rendering applies too.
		if err := shell.ValidEnvName(name); err != nil {
			k.add(join(f("env"), name), "%v", err)
		}
		// Env values may be secrets, so only the name is reported.
		if strings.ContainsRune(p.Env[name], 0) {
			k.add(join(f("env"), name), "the value holds a NUL byte, which no environment can hold")
		}
	}
	for _, name := range slices.Sorted(maps.Keys(p.Tags)) {
		if strings.HasPrefix(name, "hangar:") {
			k.add(join(f("tags"), name), `the "hangar:" prefix is reserved for Hangar's own tags`)
		}
	}
}

// renders renders a pool's user-data as serve does before it starts the
// pool, so that whatever rule user-data rendering has and this file does
// not check key by key still fails here rather than at serve. It runs only
// for a pool without other problems, whose messages say more.
func (k *checker) renders(key, name string, p Pool) {
	if !k.urlOK {
		return
	}
	_, err := userdata.Render(userdata.Params{
		Pool:           name,
		HangarURL:      k.c.Server.PublicURL,
		BootstrapToken: "probe-token",
		Env:            p.Env,
		Format:         userdata.Format(p.UserDataFormat),
		CloudConfig:    p.CloudConfig,
	})
	if err != nil {
		k.add(key, "its user-data cannot be rendered: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
}

func (k *checker) bootstrap(key, b string) {
	switch {
	case b == "":
		k.add(key, "must not be empty")
	case strings.HasPrefix(b, "builtin:"):
		if _, err := scripts.BootstrapScript(strings.TrimPrefix(b, "builtin:")); err != nil {
			k.add(key, "no built-in bootstrap script %q", strings.TrimPrefix(b, "builtin:"))
		}
	case strings.Contains(b, "://"):
		u, err := url.Parse(b)
		switch {
		case err != nil || u.Host == "":
			k.add(key, "%q is not a valid URL", b)
		case u.Scheme == "https":
		case u.Scheme == "http" && isLoopback(u.Hostname()):
		case u.Scheme == "http":
			// The script runs on every instance: over plain http anyone on
			// the path could swap it.
			k.add(key, "http:// is only allowed for a loopback host; use https://")
		default:
			k.add(key, "unsupported URL scheme %q; use https://", u.Scheme)
		}
	default:
		if fi, err := os.Stat(b); err != nil {
			k.add(key, "%v", err)
		} else if fi.IsDir() {
			k.add(key, "%s is a directory", b)
		} else if _, err := scripts.ExpandFile(b); err != nil {
			// What an instance would be served: a missing include is
			// found here, not at boot_timeout.
			k.add(key, "%v", err)
		}
	}
}

var accountRe = regexp.MustCompile(`^[0-9]{12}$`)

// identity checks a pool's signed-identity settings: what they need, and
// that the certificate file holds certificates that can verify.
func (k *checker) identity(key string, p Pool) {
	f := func(name string) string { return join(key, name) }
	k.oneOf(f("identity"), p.Identity, "none", "signed")
	if p.Identity != "signed" {
		for _, kv := range [][2]string{{"identity_certificate", p.IdentityCertificate}, {"identity_account", p.IdentityAccount}} {
			if kv[1] != "" {
				k.add(f(kv[0]), `is only used with identity = "signed"`)
			}
		}
		return
	}
	if !bootstrapEnrolls(p.Bootstrap) {
		k.add(f("identity"), "instances present their identity when they enroll, through the bootstrap, and %s does not (include builtin:generic.sh in it)", p.Bootstrap)
	}
	if p.IdentityAccount != "" && !accountRe.MatchString(p.IdentityAccount) {
		k.add(f("identity_account"), "must be a 12-digit account id")
	}
	switch prov, ok := k.c.Providers[p.Provider]; {
	case p.IdentityCertificate != "":
		b, err := os.ReadFile(p.IdentityCertificate)
		if err == nil {
			_, err = identity.FromPEM(b)
		}
		if err != nil {
			k.add(f("identity_certificate"), "%v", err)
		}
	case ok && prov.Type != "local":
		// Hangar ships no cloud's certificates: AWS publishes them per
		// region, and they are rotated.
		k.add(f("identity"), `"signed" needs identity_certificate: a PEM file of the certificate your cloud signs instance identity documents with (on AWS, your region's RSA certificate from the EC2 User Guide's "instance identity documents" pages)`)
	}
}

// bootstrapEnrolls says whether bootstrap b enrolls a batch's instances:
// the built-in scripts and files that include builtin:generic.sh do. A
// URL's script is not known until it is fetched, so it is taken not to;
// a file that cannot be read is reported by bootstrap.
func bootstrapEnrolls(b string) bool {
	var script []byte
	var err error
	switch {
	case strings.HasPrefix(b, "builtin:"):
		script, err = scripts.BootstrapScript(strings.TrimPrefix(b, "builtin:"))
	case strings.Contains(b, "://"):
		return false
	default:
		script, err = scripts.ExpandFile(b)
	}
	return err != nil || scripts.Enrolls(script)
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// autoscale checks that min_idle = "auto" and an autoscale table come
// together, and the table's values.
func (k *checker) autoscale(key string, p Pool) {
	f := func(name string) string { return join(key, name) }
	a := p.Autoscale
	switch {
	case p.MinIdle.Auto && a == nil:
		k.add(f("min_idle"), `"auto" needs a [%s] table (target_wait_p95, max_idle)`, f("autoscale"))
		return
	case !p.MinIdle.Auto && a != nil:
		k.add(f("autoscale"), `is only used with min_idle = "auto"`)
		return
	case a == nil:
		return
	}
	t := f("autoscale")
	k.notNegative(join(t, "target_wait_p95"), int64(a.TargetWaitP95.Duration))
	if a.MaxIdle == nil {
		return
	}
	switch n := *a.MaxIdle; {
	case n < 0:
		k.add(join(t, "max_idle"), "must not be negative")
	case n > p.MaxInstances && p.MaxInstances >= 1:
		k.pair(join(t, "max_idle"), fmt.Sprintf("must be ≤ max_instances (%d)", p.MaxInstances),
			f("max_instances"), fmt.Sprintf("must be ≥ autoscale.max_idle (%d)", n))
	}
}

// short writes 24h rather than time.Duration's 24h0m0s.
func short(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}
