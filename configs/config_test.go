package configs

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/hangar-ci/hangar/internal/shell"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/userdata"
)

func TestShippedConfigsValidate(t *testing.T) {
	c, err := LoadDefault()
	if err != nil {
		t.Fatalf("embedded local.toml: %v", err)
	}
	demo, ok := c.Pools["demo"]
	if !ok || demo.Provider != "local" || c.Providers["local"].Type != "local" {
		t.Fatalf("local.toml has no demo pool on a local provider: %+v", c)
	}
	if demo.MinIdle != (MinIdle{N: 1}) || demo.MaxInstances != 4 || demo.IdleTTD.Duration != 5*time.Minute ||
		demo.BootTimeout.Duration != 2*time.Minute || demo.Bootstrap != "builtin:generic.sh" {
		t.Errorf("demo pool = %+v", demo)
	}
	if c.Path != "" || c.Server.Listen != "127.0.0.1:7878" || c.Server.PublicURL != "http://127.0.0.1:7878" || c.Server.DataDir != ".hangar" {
		t.Errorf("server = %+v, path %q", c.Server, c.Path)
	}

	c, err = Load("ec2.example.toml")
	if err != nil {
		t.Fatalf("ec2.example.toml: %v", err)
	}
	p := c.Pools["linux"]
	if c.Providers[p.Provider].Type != "ec2" || p.Spot != "prefer" || len(p.InstanceTypes) < 2 || len(p.Subnets) == 0 ||
		p.MetadataOptions != (MetadataOptions{HTTPTokens: "required", HopLimit: 1}) {
		t.Errorf("linux pool = %+v", p)
	}
	if c := p.Cache; c == nil || *c != (Cache{Volume: "deps", SizeGB: 20, Mount: "/cache", Keep: 3, Refresh: Duration{6 * time.Hour}}) {
		t.Errorf("linux pool's cache = %+v", c)
	}
	if b := p.Bake; b == nil || !filepath.IsAbs(b.Script) || filepath.Base(b.Script) != "linux.sh" || b.Keep != 2 {
		t.Errorf("linux pool's bake = %+v", b)
	}
}

func TestDefaultsApplied(t *testing.T) {
	c, err := Parse("hangar.toml", []byte(`
[server]
listen = "127.0.0.1:9000"
[providers.local]
type = "local"
[providers.aws]
type = "ec2"
region = "eu-west-1"
[pools.a]
provider = "local"
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Server.Listen = "127.0.0.1:9000"
	want.Server.PublicURL = "http://127.0.0.1:9000"
	want.Server.DataDir, _ = filepath.Abs(".hangar") // beside hangar.toml
	if !reflect.DeepEqual(c.Server, want.Server) {
		t.Errorf("server = %+v, want %+v", c.Server, want.Server)
	}
	if got := c.Providers["aws"].CapacityRetry.Duration; got != time.Minute {
		t.Errorf("capacity_retry = %v, want 1m", got)
	}
	wantPool := Pool{
		Provider:        "local",
		Spot:            "off",
		MetadataOptions: MetadataOptions{HTTPTokens: "required", HopLimit: 1},
		MaxInstances:    4,
		IdleTTD:         Duration{10 * time.Minute},
		BootTimeout:     Duration{5 * time.Minute},
		LeaseTTL:        Duration{time.Hour},
		MaxLeaseTTL:     Duration{24 * time.Hour},
		OnIdle:          "terminate",
		Bootstrap:       "builtin:generic.sh",
		UserDataFormat:  "script",
		ClaimTimeout:    Duration{2 * time.Minute},
		LaunchBatch:     50,
		Identity:        "none",
	}
	if got := c.Pools["a"]; !reflect.DeepEqual(got, wantPool) {
		t.Errorf("pool = %+v\nwant   %+v", got, wantPool)
	}
}

// A set value, even a zero, is never replaced by a default.
func TestZeroIsNotDefault(t *testing.T) {
	_, err := Parse("hangar.toml", []byte(`
[providers.local]
type = "local"
[pools.a]
provider = "local"
max_instances = 0
idle_ttd = "0s"
`))
	want := "hangar.toml:6: pools.a.max_instances: must be ≥ 1\n" +
		"hangar.toml:7: pools.a.idle_ttd: must be positive"
	if err == nil || err.Error() != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}

// base is a valid config that the cases below extend; lines 1-4.
const base = `[providers.local]
type = "local"
[pools.demo]
provider = "local"
`

func TestBadConfigs(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, toml, want string
	}{{
		name: "every kind of problem at once",
		toml: base + `min_idle = 5
idle_ttd = "5 minutes"
max_uses = "many"
colour = "blue"
[server]
reconcile_interval = "0s"
`,
		want: `hangar.toml:5: pools.demo.min_idle: must be ≤ max_instances (4)
hangar.toml:6: pools.demo.idle_ttd: invalid duration "5 minutes": use a number and a unit, e.g. "90s", "5m", "1h"
hangar.toml:7: pools.demo.max_uses: must be an integer, not a string
hangar.toml:8: pools.demo.colour: unknown key
hangar.toml:10: server.reconcile_interval: must be positive`,
	}, {
		name: "syntax error stops everything else",
		toml: base + "min_idle = \nmax_uses = \"x\"\n",
		want: `hangar.toml:5: invalid toml: expected value but found '\n' instead`,
	}, {
		name: "unknown table reported once",
		toml: base + "[pool.other]\nprovider = \"local\"\n",
		want: "hangar.toml:5: pool: unknown key",
	}, {
		name: "type mismatches",
		toml: base + `instance_types = "t3.small"
env = ["A"]
[server]
tokens = 3
listen = 7878
`,
		want: `hangar.toml:5: pools.demo.instance_types: must be an array, not a string
hangar.toml:6: pools.demo.env: must be a table, not an array
hangar.toml:8: server.tokens: must be an array, not an integer
hangar.toml:9: server.listen: must be a string, not an integer`,
	}, {
		name: "max_instances set below min_idle",
		toml: base + "min_idle = 3\nmax_instances = 2\nlease_ttl = \"48h\"\n",
		want: "hangar.toml:6: pools.demo.max_instances: must be ≥ min_idle (3)\n" +
			"hangar.toml:7: pools.demo.lease_ttl: must be ≤ max_lease_ttl (24h)",
	}, {
		name: "names and providers",
		toml: `[providers.Local]
type = "local"
[providers.aws]
type = "ec2"
[providers.gce]
type = "gce"
[providers.none]
[pools."my pool"]
provider = "local"
[pools.on-aws]
provider = "aws"
[pools.orphan]
`,
		want: `hangar.toml:1: providers.Local: invalid name: must match ^[a-z0-9][a-z0-9._-]{0,62}$
hangar.toml:3: providers.aws: region is required for type "ec2"
hangar.toml:6: providers.gce.type: must be "local" or "ec2", not "gce"
hangar.toml:7: providers.none: type is required ("local" or "ec2")
hangar.toml:8: pools."my pool": invalid name: must match ^[a-z0-9][a-z0-9._-]{0,62}$
hangar.toml:9: pools."my pool".provider: no provider named "local" (defined: Local, aws, gce, none)
hangar.toml:10: pools.on-aws: image is required for an ec2 provider
hangar.toml:10: pools.on-aws: instance_types is required for an ec2 provider
hangar.toml:12: pools.orphan: provider is required`,
	}, {
		name: "staging",
		toml: `[providers.local]
type = "local"
ssh_port = 70000
[providers.local.staging]
on_exit = "never"
ready_timeout = "-1m"
user = 7
[pools.demo]
provider = "local"
`,
		want: `hangar.toml:3: providers.local.ssh_port: must be a port number, not 70000
hangar.toml:5: providers.local.staging.on_exit: must be "stop", "terminate" or "run", not "never"
hangar.toml:6: providers.local.staging.ready_timeout: must not be negative
hangar.toml:7: providers.local.staging.user: must be a string, not an integer`,
	}, {
		name: "neither pools nor providers",
		toml: "[server]\nlisten = \"127.0.0.1:7878\"\n",
		want: "hangar.toml: pools: no pools and no providers: nothing to serve or stage with",
	}, {
		name: "pool enums, env, tags, cloud_config",
		toml: base + `spot = "always"
on_idle = "hibernate"
userdata_format = "yaml"
cloud_config = "packages: [git]"
max_uses = -1
min_idle = -1
metadata_options = { http_tokens = "no", hop_limit = 0 }
[pools.demo.env]
"1X" = "a"
HANGAR_URL = "b"
OK = "c"
BASH_ENV = "/tmp/x"
NUL = "a\u0000b"
[pools.demo.tags]
"hangar:pool" = "x"
team = "ci"
`,
		want: `hangar.toml:5: pools.demo.spot: must be "off", "prefer" or "only", not "always"
hangar.toml:6: pools.demo.on_idle: must be "terminate" or "stop", not "hibernate"
hangar.toml:7: pools.demo.userdata_format: must be "script", "cloud-config" or "mime", not "yaml"
hangar.toml:8: pools.demo.cloud_config: is only used with userdata_format = "mime"
hangar.toml:8: pools.demo.cloud_config: must start with "#cloud-config"
hangar.toml:9: pools.demo.max_uses: must not be negative
hangar.toml:10: pools.demo.min_idle: must not be negative
hangar.toml:11: pools.demo.metadata_options.http_tokens: must be "required" or "optional", not "no"
hangar.toml:11: pools.demo.metadata_options.hop_limit: must be between 1 and 64
hangar.toml:13: pools.demo.env.1X: invalid env name "1X": use letters, digits and '_', not starting with a digit
hangar.toml:14: pools.demo.env.HANGAR_URL: invalid env name "HANGAR_URL": the prefix HANGAR_ is reserved for Hangar's own variables
hangar.toml:16: pools.demo.env.BASH_ENV: invalid env name "BASH_ENV": it changes how the bootstrap script runs
hangar.toml:17: pools.demo.env.NUL: the value holds a NUL byte, which no environment can hold
hangar.toml:19: pools.demo.tags."hangar:pool": the "hangar:" prefix is reserved for Hangar's own tags`,
	}, {
		name: "bootstrap",
		toml: `[providers.local]
type = "local"
[pools.a]
provider = "local"
bootstrap = "http://example.com/boot.sh"
[pools.b]
provider = "local"
bootstrap = "ftp://example.com/boot.sh"
[pools.c]
provider = "local"
bootstrap = "missing.sh"
[pools.d]
provider = "local"
bootstrap = "builtin:nope.sh"
[pools.e]
provider = "local"
bootstrap = "http://127.0.0.1:8000/boot.sh"
[pools.f]
provider = "local"
bootstrap = "https://example.com/boot.sh"
`,
		want: `hangar.toml:5: pools.a.bootstrap: http:// is only allowed for a loopback host; use https://
hangar.toml:8: pools.b.bootstrap: unsupported URL scheme "ftp"; use https://
hangar.toml:11: pools.c.bootstrap: stat ` + filepath.Join(dir, "missing.sh") + `: no such file or directory
hangar.toml:14: pools.d.bootstrap: no built-in bootstrap script "nope.sh"`,
	}, {
		name: "open non-loopback listen",
		toml: base + "[server]\nlisten = \"0.0.0.0:7878\"\n",
		want: `hangar.toml:6: server.listen: refusing to serve without tokens on a non-loopback address
hangar.toml: server.public_url: must name a host instances can reach, not "http://0.0.0.0:7878"`,
	}, {
		name: "server addresses",
		toml: base + `[server]
listen = "localhost"
public_url = "ftp://x"
data_dir = ""
orphan_grace = "-1s"
`,
		want: `hangar.toml:6: server.listen: must be host:port, such as "127.0.0.1:7878", not "localhost"
hangar.toml:7: server.public_url: must be an http:// or https:// URL, not "ftp://x"
hangar.toml:8: server.data_dir: must not be empty
hangar.toml:9: server.orphan_grace: must not be negative`,
	}, {
		name: "tokens, each at its own lines",
		toml: base + `[server]
listen = ":7878"
public_url = "https://ci.example.com:7878"
[[server.tokens]]
name = "a"
role = "lease"
token_env = "A"
[[server.tokens]]
name = "a"
role = "root"
token_env = "B"
token = "hunter2"
[[server.tokens]]
`,
		want: `hangar.toml:12: server.tokens[1]: set only one of token_env, token_file or token
hangar.toml:13: server.tokens[1].name: duplicate token name "a" (also server.tokens[0])
hangar.toml:14: server.tokens[1].role: must be "lease" or "admin", not "root"
hangar.toml:17: server.tokens[2]: name is required
hangar.toml:17: server.tokens[2]: role is required ("lease" or "admin")
hangar.toml:17: server.tokens[2]: one of token_env, token_file or token is required`,
	}, {
		name: "launch_batch out of range",
		toml: base + "launch_batch = 0\n[pools.big]\nprovider = \"local\"\nlaunch_batch = 1001\n[pools.word]\nprovider = \"local\"\nlaunch_batch = \"50\"\n",
		want: `hangar.toml:5: pools.demo.launch_batch: must be between 1 and 1000
hangar.toml:8: pools.big.launch_batch: must be between 1 and 1000
hangar.toml:11: pools.word.launch_batch: must be an integer, not a string`,
	}, {
		name: "signed identity",
		toml: base + `identity = "maybe"
identity_account = "123"
[providers.aws]
type = "ec2"
region = "us-east-1"
[pools.aws]
provider = "aws"
image = "ami-0123456789abcdef0"
instance_types = ["t3.small"]
identity = "signed"
identity_account = "1234"
[pools.cert]
provider = "local"
identity = "signed"
identity_certificate = "/dev/null"
`,
		want: `hangar.toml:5: pools.demo.identity: must be "none" or "signed", not "maybe"
hangar.toml:6: pools.demo.identity_account: is only used with identity = "signed"
hangar.toml:14: pools.aws.identity: "signed" needs identity_certificate: a PEM file of the certificate your cloud signs instance identity documents with (on AWS, your region's RSA certificate from the EC2 User Guide's "instance identity documents" pages)
hangar.toml:15: pools.aws.identity_account: must be a 12-digit account id
hangar.toml:19: pools.cert.identity_certificate: reading identity certificate: no certificate`,
	}, {
		name: "inline tokens, unknown key and bad type in the second one",
		toml: base + `[server]
tokens = [
  { name = "a", role = "lease", token_env = "A" },
  { name = "b", role = "admin", token_file = 7, secret = "hunter2" },
]
`,
		want: `hangar.toml:8: server.tokens[1].secret: unknown key
hangar.toml:8: server.tokens[1].token_file: must be a string, not an integer`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(filepath.Join(dir, "hangar.toml"), []byte(tc.toml))
			if err == nil {
				t.Fatalf("no error, want:\n%s", tc.want)
			}
			// Messages name the file as the user gave it.
			got := strings.ReplaceAll(err.Error(), filepath.Join(dir, "hangar.toml"), "hangar.toml")
			if got != tc.want {
				t.Errorf("got:\n%s\nwant:\n%s", got, tc.want)
			}
			if strings.Contains(got, "hunter2") {
				t.Errorf("error shows a secret:\n%s", got)
			}
		})
	}
}

func TestValidateWithoutFile(t *testing.T) {
	c := Default()
	c.Providers = map[string]Provider{"local": {Type: "local"}}
	c.Pools = map[string]Pool{"demo": {Provider: "local"}}
	want := `local.toml (embedded): pools.demo.spot: must be "off", "prefer" or "only", not ""
local.toml (embedded): pools.demo.metadata_options.http_tokens: must be "required" or "optional", not ""
local.toml (embedded): pools.demo.metadata_options.hop_limit: must be between 1 and 64
local.toml (embedded): pools.demo.max_instances: must be ≥ 1
local.toml (embedded): pools.demo.idle_ttd: must be positive
local.toml (embedded): pools.demo.boot_timeout: must be positive
local.toml (embedded): pools.demo.lease_ttl: must be positive
local.toml (embedded): pools.demo.max_lease_ttl: must be positive
local.toml (embedded): pools.demo.launch_batch: must be between 1 and 1000
local.toml (embedded): pools.demo.on_idle: must be "terminate" or "stop", not ""
local.toml (embedded): pools.demo.identity: must be "none" or "signed", not ""
local.toml (embedded): pools.demo.bootstrap: must not be empty
local.toml (embedded): pools.demo.userdata_format: must be "script", "cloud-config" or "mime", not ""
local.toml (embedded): pools.demo.claim_timeout: must be positive`
	if err := c.Validate(); err == nil || err.Error() != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}

	c, err := LoadDefault()
	if err != nil {
		t.Fatal(err)
	}
	c.Server.Listen = "0.0.0.0:7878"
	want = "local.toml (embedded):10: server.listen: refusing to serve without tokens on a non-loopback address"
	if err := c.Validate(); err == nil || err.Error() != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}

func TestRelativePaths(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "scripts"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "scripts", "boot.sh"), []byte("#!/bin/bash\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "hangar.toml")
	err := os.WriteFile(path, []byte(base+`bootstrap = "scripts/boot.sh"
data_dir_is_not_here = false
[pools.abs]
provider = "local"
bootstrap = "`+filepath.Join(dir, "scripts", "boot.sh")+`"
[server]
data_dir = "state"
[[server.tokens]]
name = "a"
role = "admin"
token_file = "secrets/a.token"
`), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	// Unknown key first: a failed load reports the file's own name.
	if _, err := Load(path); err == nil || err.Error() != path+":6: pools.demo.data_dir_is_not_here: unknown key" {
		t.Fatalf("got %v", err)
	}
	data, _ := os.ReadFile(path)
	if err := os.WriteFile(path, []byte(strings.Replace(string(data), "data_dir_is_not_here = false\n", "", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "scripts", "boot.sh"); c.Pools["demo"].Bootstrap != want || c.Pools["abs"].Bootstrap != want {
		t.Errorf("bootstrap = %q, %q, want %q", c.Pools["demo"].Bootstrap, c.Pools["abs"].Bootstrap, want)
	}
	if want := filepath.Join(dir, "secrets", "a.token"); c.Server.Tokens[0].TokenFile != want {
		t.Errorf("token_file = %q, want %q", c.Server.Tokens[0].TokenFile, want)
	}
	if want := filepath.Join(dir, "state"); c.Server.DataDir != want {
		t.Errorf("data_dir = %q, want %q: relative to the config file", c.Server.DataDir, want)
	}
}

// A batch's instances enroll through the bootstrap: the default batch is
// for bootstraps that do (the built-in ones, files that include
// builtin:generic.sh); one that does not, or may not (a URL), launches one
// instance a call, and asking it for batches is an error.
func TestLaunchBatchFollowsTheBootstrap(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("own.sh", "#!/bin/bash\necho my own protocol\n")
	write("wraps.sh", "#!/bin/bash\n# hangar:include builtin:generic.sh\n")
	pools := `
[providers.local]
type = "local"
[pools.builtin]
provider = "local"
[pools.wraps]
provider = "local"
bootstrap = "wraps.sh"
[pools.own]
provider = "local"
bootstrap = "own.sh"
[pools.url]
provider = "local"
bootstrap = "https://example.com/boot.sh"
[pools.own1]
provider = "local"
bootstrap = "own.sh"
launch_batch = 1
`
	path := filepath.Join(dir, "hangar.toml")
	write("hangar.toml", pools)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{"builtin": DefaultLaunchBatch, "wraps": DefaultLaunchBatch, "own": 1, "url": 1, "own1": 1} {
		if got := c.Pools[name].LaunchBatch; got != want {
			t.Errorf("pool %s: launch_batch %d, want %d", name, got, want)
		}
	}
	write("hangar.toml", pools+"[pools.ownbatch]\nprovider = \"local\"\nbootstrap = \"own.sh\"\nlaunch_batch = 10\n"+
		"[pools.urlbatch]\nprovider = \"local\"\nbootstrap = \"https://example.com/boot.sh\"\nlaunch_batch = 2\n")
	_, err = Load(path)
	for _, want := range []string{
		path + ":22: pools.ownbatch.launch_batch: the instances of a batch enroll through the bootstrap, and " + filepath.Join(dir, "own.sh") + " does not",
		path + ":26: pools.urlbatch.launch_batch: the instances of a batch enroll through the bootstrap, and https://example.com/boot.sh does not",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v\nwant it to say %q", err, want)
		}
	}
}

func TestTokenSecret(t *testing.T) {
	const secret = "s3cr3t-value"
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("HANGAR_TEST_TOKEN", secret)
	t.Setenv("HANGAR_TEST_EMPTY", "")
	for _, tc := range []struct {
		name    string
		token   Token
		want    string
		wantErr string
	}{
		{"env", Token{Name: "a", TokenEnv: "HANGAR_TEST_TOKEN"}, secret, ""},
		{"file", Token{Name: "a", TokenFile: write("nl", secret+"\n")}, secret, ""},
		{"file crlf", Token{Name: "a", TokenFile: write("crlf", secret+"\r\n")}, secret, ""},
		{"literal", Token{Name: "a", Token: secret}, secret, ""},
		{"env unset", Token{Name: "a", TokenEnv: "HANGAR_TEST_UNSET"}, "", `token "a": environment variable HANGAR_TEST_UNSET is not set or empty`},
		{"env empty", Token{Name: "a", TokenEnv: "HANGAR_TEST_EMPTY"}, "", `token "a": environment variable HANGAR_TEST_EMPTY is not set or empty`},
		{"file empty", Token{Name: "a", TokenFile: write("empty", "\n")}, "", `token "a": token_file ` + filepath.Join(dir, "empty") + ` is empty`},
		{"file missing", Token{Name: "a", TokenFile: filepath.Join(dir, "missing")}, "", `token "a": reading token_file: open ` + filepath.Join(dir, "missing") + `: no such file or directory`},
		{"none", Token{Name: "a"}, "", `token "a": none of token_env, token_file or token is set`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.token.Secret()
			if got != tc.want {
				t.Errorf("secret = %q, want %q", got, tc.want)
			}
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr) {
				t.Errorf("err = %v, want %q", err, tc.wantErr)
			}
			if err != nil && strings.Contains(err.Error(), secret) {
				t.Errorf("error shows the secret: %v", err)
			}
		})
	}
	if s := (Token{Name: "a", Role: "lease", Token: secret}).String(); strings.Contains(s, secret) {
		t.Errorf("String() shows the secret: %s", s)
	}
}

func TestDurationText(t *testing.T) {
	var d Duration
	if err := d.UnmarshalText([]byte("1h30m")); err != nil || d.Duration != 90*time.Minute {
		t.Fatalf("got %v, %v", d, err)
	}
	if b, _ := d.MarshalText(); string(b) != "1h30m" {
		t.Errorf("MarshalText = %q", b)
	}
	if b, _ := (Duration{24 * time.Hour}).MarshalText(); string(b) != "24h" {
		t.Errorf("MarshalText = %q", b)
	}
}

func TestIndexLines(t *testing.T) {
	src := "# comment [not.a.table]\r\n" + // 1
		"top = 1 # x = 2\r\n" + // 2
		"[server]\n" + // 3
		`listen = """` + "\n" + // 4
		"[fake]\n" + // 5
		`fake = 1 \"""` + "\n" + // 6
		`"""` + "\n" + // 7
		"list = [\n" + // 8
		"  'a]', # ]\n" + // 9
		"  { k = 1 },\n" + // 10
		"]\n" + // 11
		"a.b.c = 'x'\n" + // 12
		`"quoted.key" = '''x` + "\n" + // 13
		`y'''''` + "\n" + // 14
		"[[server.tokens]]\n" + // 15
		"name = 'one'\n" + // 16
		"[server.tokens.sub]\n" + // 17
		"x = 1\n" + // 18
		"[[server.tokens]]\n" + // 19
		"name = 'two'\n" + // 20
		"inline = { a = { b = 1 }, c = 2 }\n" + // 21
		"[ pools . demo ]\n" + // 22
		"when = 1979-05-27 07:32:00Z\n" // 23
	if _, err := toml.Decode(src, new(map[string]any)); err != nil {
		t.Fatalf("test document is not valid TOML: %v", err)
	}
	got := indexLines(src)
	want := map[string]int{
		"top":                         2,
		"server":                      3,
		"server.listen":               4,
		"server.list":                 8,
		"server.list[0]":              9,
		"server.list[1]":              10,
		"server.list[1].k":            10,
		"server.a":                    12,
		"server.a.b":                  12,
		"server.a.b.c":                12,
		`server."quoted.key"`:         13,
		"server.tokens":               15,
		"server.tokens[0]":            15,
		"server.tokens[0].name":       16,
		"server.tokens[0].sub":        17,
		"server.tokens[0].sub.x":      18,
		"server.tokens[1]":            19,
		"server.tokens[1].name":       20,
		"server.tokens[1].inline":     21,
		"server.tokens[1].inline.a":   21,
		"server.tokens[1].inline.a.b": 21,
		"server.tokens[1].inline.c":   21,
		"pools":                       22,
		"pools.demo":                  22,
		"pools.demo.when":             23,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
}

// Two tokens with one secret, or a short secret, are refused at their
// lines, without the secret; Load skips a secret that is not there yet,
// and Check, which serve's checks share, reports it.
func TestTokenSecrets(t *testing.T) {
	const long = "0123456789abcdef-same-secret"
	t.Setenv("HANGAR_TEST_SAME", long)
	t.Setenv("HANGAR_TEST_SHORT", "short-secret")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "same.token"), []byte(long+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "hangar.toml")
	text := base + `[server]
[[server.tokens]]
name = "a"
role = "lease"
token = "` + long + `"
[[server.tokens]]
name = "b"
role = "admin"
token_env = "HANGAR_TEST_SAME"
[[server.tokens]]
name = "c"
role = "lease"
token_file = "same.token"
[[server.tokens]]
name = "d"
role = "lease"
token_env = "HANGAR_TEST_SHORT"
[[server.tokens]]
name = "e"
role = "lease"
token_env = "HANGAR_TEST_UNSET_TOKEN"
[[server.tokens]]
name = "f"
role = "lease"
token_file = "missing.token"
`
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	want := path + `:13: server.tokens[1].token_env: the same secret as server.tokens[0]: every token needs a secret of its own
` + path + `:17: server.tokens[2].token_file: the same secret as server.tokens[0]: every token needs a secret of its own
` + path + `:21: server.tokens[3].token_env: the secret is shorter than 16 bytes; use a random one, such as ` + "`openssl rand -hex 32`" + ` makes`
	_, loadErr := Load(path)
	if loadErr == nil || loadErr.Error() != want {
		t.Errorf("Load: got:\n%v\nwant:\n%s", loadErr, want)
	}
	wantServing := want + `
` + path + `:25: server.tokens[4].token_env: environment variable HANGAR_TEST_UNSET_TOKEN is not set or empty
` + path + `:29: server.tokens[5].token_file: reading token_file: open ` + filepath.Join(dir, "missing.token") + `: no such file or directory`
	_, checkErr := Check(path)
	if checkErr == nil || checkErr.Error() != wantServing {
		t.Errorf("Check: got:\n%v\nwant:\n%s", checkErr, wantServing)
	}
	for _, e := range []error{loadErr, checkErr} {
		if e != nil && (strings.Contains(e.Error(), long) || strings.Contains(e.Error(), "short-secret")) {
			t.Errorf("an error shows a secret: %v", e)
		}
	}

	// Distinct, long secrets pass; an unset variable passes Load only.
	t.Setenv("HANGAR_TEST_SHORT", "another-secret-that-is-long")
	ok := strings.NewReplacer(`token_env = "HANGAR_TEST_SAME"`, `token = "a-third-secret-long-enough"`,
		`token_file = "same.token"`, `token = "a-fourth-secret-long-enough"`,
		`token_file = "missing.token"`, `token = "a-fifth-secret-long-enough"`).Replace(text)
	c, err := Parse(path, []byte(ok))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want = `hangar.toml:25: server.tokens[4].token_env: environment variable HANGAR_TEST_UNSET_TOKEN is not set or empty`
	if err := c.ValidateServing(); err == nil || strings.ReplaceAll(err.Error(), path, "hangar.toml") != want {
		t.Errorf("ValidateServing: got %v, want %s", err, want)
	}
	t.Setenv("HANGAR_TEST_UNSET_TOKEN", "now-it-is-set-and-long")
	if err := c.ValidateServing(); err != nil {
		t.Errorf("ValidateServing: %v", err)
	}
}

// An http:// public_url to another host is refused unless insecure_http;
// TLS makes the derived one https://; the URL rules of user-data rendering
// apply here too, and a password in the URL is never shown.
func TestPublicURL(t *testing.T) {
	dir := t.TempDir()
	token := "\n[[server.tokens]]\nname = \"a\"\nrole = \"lease\"\ntoken = \"0123456789abcdef0123\"\n"
	inClear := "http:// to a non-loopback host would send bootstrap tokens and worker passwords across the network in clear: " +
		"set tls_cert and tls_key, or give an https:// URL of a TLS proxy, or set insecure_http = true to accept that"
	for _, tc := range []struct {
		name, server, want, url string
	}{
		{"loopback http", `public_url = "http://127.0.0.1:7878"`, "", "http://127.0.0.1:7878"},
		{"localhost http", `public_url = "http://LocalHost:7878"`, "", "http://LocalHost:7878"},
		{"remote http", `public_url = "http://10.0.0.10:7878"`, "hangar.toml:6: server.public_url: " + inClear, ""},
		{"remote http accepted", "public_url = \"http://10.0.0.10:7878\"\ninsecure_http = true", "", "http://10.0.0.10:7878"},
		{"remote https", `public_url = "https://ci.example:7878"`, "", "https://ci.example:7878"},
		{"derived from listen", `listen = "10.0.0.10:7878"`, "hangar.toml:6: server.listen: " + inClear, ""},
		{"derived with TLS", "listen = \"10.0.0.10:7878\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"", "", "https://10.0.0.10:7878"},
		{"http with TLS", "public_url = \"http://127.0.0.1:7878\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
			"hangar.toml:6: server.public_url: is http:// but the server listens with TLS (tls_cert, tls_key); use https://", ""},
		{"user and password", `public_url = "https://user:pa55word@ci.example"`, "hangar.toml:6: server.public_url: must not carry a user or password", ""},
		{"query", `public_url = "https://ci.example/?x=1"`, "hangar.toml:6: server.public_url: must not have a query or fragment", ""},
		{"white space", `public_url = "https://ci.example/a b"`, "hangar.toml:6: server.public_url: must not contain white space", ""},
		{"bad scheme with password", `public_url = "ftp://user:pa55word@ci.example"`,
			`hangar.toml:6: server.public_url: must be an http:// or https:// URL, not "ftp://user:xxxxx@ci.example"`, ""},
		{"cert without key", `tls_cert = "c.pem"`, "hangar.toml:6: server.tls_cert: is set without tls_key; set both or neither", ""},
		{"key without cert", `tls_key = "k.pem"`, "hangar.toml:6: server.tls_key: is set without tls_cert; set both or neither", ""},
		{"insecure_http not a boolean", `insecure_http = "yes"`, "hangar.toml:6: server.insecure_http: must be a boolean, not a string", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse(filepath.Join(dir, "hangar.toml"), []byte(base+"[server]\n"+tc.server+"\n"+token))
			got := ""
			if err != nil {
				got = strings.ReplaceAll(err.Error(), filepath.Join(dir, "hangar.toml"), "hangar.toml")
			}
			if got != tc.want {
				t.Errorf("got:\n%s\nwant:\n%s", got, tc.want)
			}
			if strings.Contains(got, "pa55word") {
				t.Errorf("an error shows the password: %s", got)
			}
			if err == nil && c.Server.PublicURL != tc.url {
				t.Errorf("public_url = %q, want %q", c.Server.PublicURL, tc.url)
			}
		})
	}
}

// Check loads tls_cert and tls_key as serve would: missing files and keys
// that do not match are reported; Load does not read them.
func TestTLSFiles(t *testing.T) {
	dir := t.TempDir()
	testutil.SelfSignedCert(t, dir, "a")
	testutil.SelfSignedCert(t, dir, "b")
	path := filepath.Join(dir, "hangar.toml")
	for _, tc := range []struct{ name, cert, key, want string }{
		{"a pair", "a.crt", "a.key", ""},
		{"missing", "none.crt", "a.key", path + ":7: server.tls_cert: stat " + filepath.Join(dir, "none.crt") + ": no such file or directory"},
		{"not a pair", "a.crt", "b.key", path + ":7: server.tls_cert: does not load with tls_key as a key pair: tls: private key does not match public key"},
		{"key for cert", "a.key", "a.key", path + ":7: server.tls_cert: does not load with tls_key as a key pair: tls: failed to find certificate PEM data in certificate input, but did find a private key; PEM inputs may have been switched"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := base + "[server]\nlisten = \"127.0.0.1:7443\"\ntls_cert = \"" + tc.cert + "\"\ntls_key = \"" + tc.key + "\"\n"
			if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := Load(path)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if c.Server.PublicURL != "https://127.0.0.1:7443" || c.Server.TLSCert != filepath.Join(dir, tc.cert) {
				t.Errorf("public_url %q, tls_cert %q", c.Server.PublicURL, c.Server.TLSCert)
			}
			_, checkErr := Check(path)
			if tc.want == "" && checkErr != nil || tc.want != "" && fmt.Sprint(checkErr) != tc.want {
				t.Errorf("Check: got:\n%v\nwant:\n%s", checkErr, tc.want)
			}
			if err := c.ValidateServing(); fmt.Sprint(err) != fmt.Sprint(checkErr) {
				t.Errorf("ValidateServing: %v; Check: %v", err, checkErr)
			}
		})
	}
}

func TestPoolWorkerUserAndClaimTimeout(t *testing.T) {
	c, err := Parse("hangar.toml", []byte(base+"worker_user = \"build_er-1\"\nclaim_timeout = \"30s\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p := c.Pools["demo"]; p.WorkerUser != "build_er-1" || p.ClaimTimeout.Duration != 30*time.Second {
		t.Errorf("pool = %+v", p)
	}
	_, err = Parse("hangar.toml", []byte(base+"worker_user = \"Root\"\nclaim_timeout = \"0s\"\n"+
		"[pools.b]\nprovider = \"local\"\nworker_user = \"a-very-long-user-name-of-33-chars\"\nclaim_timeout = \"-1s\"\n"+
		"[pools.c]\nprovider = \"local\"\nworker_user = \"9lives\"\n"))
	want := `hangar.toml:5: pools.demo.worker_user: must be a POSIX user name matching ^[a-z_][a-z0-9_-]{0,31}$, or empty for the bootstrap's own user
hangar.toml:6: pools.demo.claim_timeout: must be positive
hangar.toml:9: pools.b.worker_user: must be a POSIX user name matching ^[a-z_][a-z0-9_-]{0,31}$, or empty for the bootstrap's own user
hangar.toml:10: pools.b.claim_timeout: must be positive
hangar.toml:13: pools.c.worker_user: must be a POSIX user name matching ^[a-z_][a-z0-9_-]{0,31}$, or empty for the bootstrap's own user`
	if err == nil || err.Error() != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}

// Whatever user-data rendering refuses, the config check refuses first,
// at the key's line: serve renders every pool's user-data before it starts.
func TestConfigRefusesWhatUserdataRefuses(t *testing.T) {
	for _, name := range []string{"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "HANGAR_TOKEN", "1A", "A-B"} {
		if shell.ValidEnvName(name) == nil {
			t.Fatalf("userdata accepts %s; the test's premise is wrong", name)
		}
		_, err := Parse("hangar.toml", []byte(base+"[pools.demo.env]\n\""+name+"\" = \"x\"\n"))
		if err == nil || !strings.HasPrefix(err.Error(), "hangar.toml:6: pools.demo.env.") {
			t.Errorf("env %s: got %v", name, err)
		}
	}
	// The user-data of a pool the config accepts renders.
	c, err := Parse("hangar.toml", []byte(base+"[pools.demo.env]\nA = \"it's $HOME\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := userdata.Render(userdata.Params{Pool: "demo", HangarURL: c.Server.PublicURL, BootstrapToken: "t",
		Env: c.Pools["demo"].Env, Format: userdata.Format(c.Pools["demo"].UserDataFormat)}); err != nil {
		t.Errorf("render: %v", err)
	}
}

// A [cache] table is optional (nil without one), starts from its defaults,
// and every bad value is reported at its line.
func TestPoolCache(t *testing.T) {
	c, err := Parse("hangar.toml", []byte(base))
	if err != nil {
		t.Fatal(err)
	}
	if c.Pools["demo"].Cache != nil {
		t.Errorf("a pool without [cache] has cache %+v", c.Pools["demo"].Cache)
	}
	c, err = Parse("hangar.toml", []byte(base+"[pools.demo.cache]\nvolume = \"deps\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Pools["demo"].Cache, (&Cache{Volume: "deps", SizeGB: 20, Mount: "/cache", Keep: 3, Refresh: Duration{6 * time.Hour}}); *got != *want {
		t.Errorf("cache = %+v, want %+v", got, want)
	}
	_, err = Parse("hangar.toml", []byte(base+"[pools.demo.cache]\nvolume = \"Deps!\"\nsize_gb = 0\nmount = \"cache\"\nkeep = 0\nrefresh = \"-1h\"\n"+
		"[pools.b]\nprovider = \"local\"\ncache = { mount = \"/\" }\n"+
		"[pools.c]\nprovider = \"local\"\ncache = { mount = \"/a/../b\", size_gb = 20000 }\n"))
	want := `hangar.toml:6: pools.demo.cache.volume: invalid name: must match ^[a-z0-9][a-z0-9._-]{0,62}$
hangar.toml:7: pools.demo.cache.size_gb: must be between 1 and 16384, not 0
hangar.toml:8: pools.demo.cache.mount: must be a clean absolute path other than /, not "cache"
hangar.toml:9: pools.demo.cache.keep: must be ≥ 1: the newest snapshot is the one new instances start from
hangar.toml:10: pools.demo.cache.refresh: must not be negative
hangar.toml:13: pools.b.cache.mount: must be a clean absolute path other than /, not "/"
hangar.toml:16: pools.c.cache.size_gb: must be between 1 and 16384, not 20000
hangar.toml:16: pools.c.cache.mount: must be a clean absolute path other than /, not "/a/../b"`
	if err == nil || err.Error() != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}

// A [bake] table needs a script file, resolved against the config's
// directory, and keep ≥ 1.
func TestPoolBake(t *testing.T) {
	dir := t.TempDir()
	writeTestFile(t, filepath.Join(dir, "bake.sh"), "true\n")
	path := filepath.Join(dir, "hangar.toml")
	writeTestFile(t, path, base+"[pools.demo.bake]\nscript = \"bake.sh\"\n")
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if b := c.Pools["demo"].Bake; b == nil || b.Script != filepath.Join(dir, "bake.sh") || b.Keep != 2 {
		t.Errorf("bake = %+v", b)
	}
	writeTestFile(t, path, base+"[pools.demo.bake]\nkeep = 0\n"+
		"[pools.b]\nprovider = \"local\"\nbake = { script = \"missing.sh\" }\n"+
		"[pools.c]\nprovider = \"local\"\nbake = { script = \".\" }\n")
	_, err = Load(path)
	want := `hangar.toml:5: pools.demo.bake: script is required: the script that bakes the image
hangar.toml:6: pools.demo.bake.keep: must be ≥ 1: the newest image is the one the pool launches from
hangar.toml:9: pools.b.bake.script: stat ` + filepath.Join(dir, "missing.sh") + `: no such file or directory
hangar.toml:12: pools.c.bake.script: ` + dir + ` is a directory`
	if err == nil || strings.ReplaceAll(err.Error(), path, "hangar.toml") != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}

func writeTestFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// image = "bake:POOL" names a pool with [bake] on a provider of the same
// type; SPEC@REGION needs both halves.
func TestPoolImageSource(t *testing.T) {
	dir := t.TempDir()
	writeTestFile(t, filepath.Join(dir, "bake.sh"), "true\n")
	path := filepath.Join(dir, "hangar.toml")
	writeTestFile(t, path, base+"[pools.demo.bake]\nscript = \"bake.sh\"\n"+
		"[pools.far]\nprovider = \"local\"\nimage = \"bake:demo\"\n"+
		"[pools.there]\nprovider = \"local\"\nimage = \"hangar-demo-*@eu-test\"\n")
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]ImageSource{"far": {Pool: "demo"}, "there": {Spec: "hangar-demo-*", Region: "eu-test"}, "demo": {}} {
		if got, err := ParseImageSource(c.Pools[name].Image); err != nil || got != want {
			t.Errorf("pool %s's image source = %+v, %v; want %+v", name, got, err, want)
		}
	}
	writeTestFile(t, path, base+"image = \"bake:nope\"\n"+
		"[pools.b]\nprovider = \"local\"\nimage = \"bake:c\"\n"+
		"[pools.c]\nprovider = \"local\"\nimage = \"ami-1@\"\n"+
		"[pools.d]\nprovider = \"local\"\nimage = \"bake:\"\n")
	_, err = Load(path)
	want := `hangar.toml:5: pools.demo.image: bake:nope names no pool (defined: b, c, d, demo)
hangar.toml:8: pools.b.image: bake:c: pool c has no [bake] table
hangar.toml:11: pools.c.image: "ami-1@": want ID_OR_NAME_PATTERN@REGION
hangar.toml:14: pools.d.image: bake: needs a pool name (bake:POOL)`
	if err == nil || strings.ReplaceAll(err.Error(), path, "hangar.toml") != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}
