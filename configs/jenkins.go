package configs

import (
	"fmt"
	"maps"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/scripts"
)

// Jenkins configures `hangar jenkins` for one pool, the [pools.NAME.jenkins]
// table: which controller to watch, as whom, and the label whose queued
// builds the pool serves. Empty optional values take the defaults that
// WithDefaults fills in. A pool with one that keeps the default bootstrap
// and sets no worker_command boots builtin:jenkins-agent.sh, whose worker
// is the Jenkins inbound agent.
type Jenkins struct {
	// URL is the controller's root URL, as its agents reach it too.
	URL  string `toml:"url"`
	User string `toml:"user"`
	// Exactly one of TokenEnv and TokenFile says where the user's API token
	// is. An inline token is refused: configs end up in repositories.
	TokenEnv  string `toml:"token_env"`
	TokenFile string `toml:"token_file"` // resolved against the config file's directory
	Token     string `toml:"token"`      // only so that setting it gets a clear message
	// Label is the one Jenkins label the pool serves: builds waiting for it
	// get a node, and the nodes carry it.
	Label string `toml:"label"`
	// NodePrefix starts the name of every node the pool creates; together
	// with the nodes' description it lets a restarted Hangar find its own.
	NodePrefix string `toml:"node_prefix"`
	// RemoteFS is the nodes' root directory on the instance (Jenkins's
	// "Remote root directory"), where workspaces go.
	RemoteFS string `toml:"remote_fs"`
	// PollInterval is how often the queue and the nodes are read.
	PollInterval Duration `toml:"poll_interval"`
	// ConnectTimeout is how long a node whose instance is leased may stay
	// disconnected before the instance is thought broken and discarded.
	ConnectTimeout Duration `toml:"connect_timeout"`
}

// Defaults of the [pools.NAME.jenkins] table.
const (
	DefaultJenkinsRemoteFS        = "/var/lib/jenkins-agent"
	DefaultJenkinsPollInterval    = 10 * time.Second
	DefaultJenkinsConnectTimeout  = 5 * time.Minute
	jenkinsAgentScript            = "jenkins-agent.sh"
	maxJenkinsNodePrefix          = 55 // + 8 random characters: a 63-character worker name
	jenkinsNodePrefixSuffixLength = 8
)

var (
	// jenkinsLabelRe admits a plain label atom, one that Jenkins never has
	// to quote in a label expression or in a queue item's "why".
	jenkinsLabelRe      = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
	jenkinsNodePrefixRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
)

// Enabled reports whether the pool has a jenkins table.
func (j Jenkins) Enabled() bool { return j != Jenkins{} }

// WithDefaults fills what j leaves empty for the pool named pool, and ends
// URL with a slash so that endpoints resolve below it.
func (j Jenkins) WithDefaults(pool string) Jenkins {
	if j.URL != "" && !strings.HasSuffix(j.URL, "/") {
		j.URL += "/"
	}
	if j.NodePrefix == "" {
		j.NodePrefix = "hangar-" + pool + "-"
	}
	if j.RemoteFS == "" {
		j.RemoteFS = DefaultJenkinsRemoteFS
	}
	if j.PollInterval.Duration == 0 {
		j.PollInterval.Duration = DefaultJenkinsPollInterval
	}
	if j.ConnectTimeout.Duration == 0 {
		j.ConnectTimeout.Duration = DefaultJenkinsConnectTimeout
	}
	return j
}

// APIToken resolves the user's API token. Errors never contain it.
func (j Jenkins) APIToken() (string, error) {
	var s string
	switch {
	case j.TokenEnv != "":
		s = os.Getenv(j.TokenEnv)
		if s == "" {
			return "", fmt.Errorf("jenkins API token: environment variable %s is not set or empty", j.TokenEnv)
		}
	case j.TokenFile != "":
		b, err := os.ReadFile(j.TokenFile)
		if err != nil {
			return "", fmt.Errorf("jenkins API token: reading token_file: %w", err)
		}
		s = strings.TrimRight(string(b), "\r\n")
		if s == "" {
			return "", fmt.Errorf("jenkins API token: token_file %s is empty", j.TokenFile)
		}
	default:
		return "", fmt.Errorf("jenkins API token: neither token_env nor token_file is set")
	}
	return s, nil
}

// String keeps an inline token out of logs and %v output.
func (j Jenkins) String() string {
	return fmt.Sprintf("jenkins %s as %s, label %s", j.URL, j.User, j.Label)
}

// deriveJenkins resolves the token file and, unless the pool names its own
// bootstrap or worker command, gives its instances the built-in Jenkins
// agent.
func (p *Pool) deriveJenkins(dir string) {
	if !p.Jenkins.Enabled() {
		return
	}
	p.Jenkins.TokenFile = resolve(dir, p.Jenkins.TokenFile)
	if p.Bootstrap == "builtin:generic.sh" && p.WorkerCommand == "" {
		p.Bootstrap = "builtin:" + jenkinsAgentScript
		p.WorkerCommand = scripts.DefaultWorkerCommand(jenkinsAgentScript)
	}
}

// jenkins checks one pool's jenkins table.
func (k *checker) jenkins(pool string, j Jenkins) {
	key := join(join("pools", pool), "jenkins")
	f := func(field string) string { return join(key, field) }
	if j.URL == "" {
		k.add(key, "url is required")
	} else if u, err := url.Parse(j.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		k.add(f("url"), "must be the controller's http:// or https:// root URL, not %q", j.URL)
	} else {
		switch {
		case u.User != nil:
			k.add(f("url"), "must not hold credentials; use user and token_env or token_file")
		case u.RawQuery != "" || u.Fragment != "":
			k.add(f("url"), "must be the controller's root URL, without a query or fragment")
		case u.Scheme == "http" && !isLoopback(u.Hostname()):
			// The API token and the agents' secrets cross it.
			k.add(f("url"), "http:// is only allowed for a loopback host; use https://")
		}
	}
	if j.User == "" {
		k.add(key, "user is required")
	}
	switch {
	case j.Token != "" || k.bad(f("token")):
		k.add(f("token"), "an inline API token is not accepted; use token_env or token_file")
	case j.TokenEnv != "" && j.TokenFile != "":
		k.add(key, "set only one of token_env or token_file")
	case j.TokenEnv == "" && j.TokenFile == "" && !k.bad(f("token_env")) && !k.bad(f("token_file")):
		k.add(key, "one of token_env or token_file is required")
	}
	if j.Label == "" {
		k.add(key, "label is required")
	} else if !jenkinsLabelRe.MatchString(j.Label) {
		k.add(f("label"), "must be one plain Jenkins label (letters, digits, '.', '_' or '-', at most 128), not %q", j.Label)
	}
	prefix := j.WithDefaults(pool).NodePrefix
	switch {
	case !jenkinsNodePrefixRe.MatchString(prefix):
		k.add(f("node_prefix"), "must be letters, digits, '.', '_' or '-', starting with a letter or digit, not %q", prefix)
	case len(prefix) > maxJenkinsNodePrefix && j.NodePrefix == "":
		k.add(key, "the default node_prefix %q is over %d characters; set a shorter node_prefix", prefix, maxJenkinsNodePrefix)
	case len(prefix) > maxJenkinsNodePrefix:
		k.add(f("node_prefix"), "must be at most %d characters: node names are the prefix and %d more", maxJenkinsNodePrefix, jenkinsNodePrefixSuffixLength)
	}
	if j.RemoteFS != "" && !strings.HasPrefix(j.RemoteFS, "/") {
		k.add(f("remote_fs"), "must be an absolute path, not %q", j.RemoteFS)
	}
	k.notNegative(f("poll_interval"), int64(j.PollInterval.Duration))
	k.notNegative(f("connect_timeout"), int64(j.ConnectTimeout.Duration))
}

// jenkinsPools checks each pool's jenkins table and what pools must not
// share: two pools serving one label of one controller would both create
// nodes for the same builds.
func (k *checker) jenkinsPools(pools map[string]Pool) {
	type target struct{ url, what string }
	seen := map[target]string{}
	for _, name := range slices.Sorted(maps.Keys(pools)) {
		p := pools[name]
		if !p.Jenkins.Enabled() {
			continue
		}
		k.jenkins(name, p.Jenkins)
		j := p.Jenkins.WithDefaults(name)
		if j.URL == "" {
			continue
		}
		for _, t := range []struct{ field, what string }{{"label", "label " + j.Label}, {"node_prefix", "node_prefix " + j.NodePrefix}} {
			id := target{strings.ToLower(j.URL), t.what}
			if other, dup := seen[id]; dup && j.Label != "" {
				k.add(join(join(join("pools", name), "jenkins"), t.field), "pool %s already has %s on %s", other, t.what, j.URL)
				continue
			}
			seen[id] = name
		}
	}
}
