package configs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/scripts"
)

const jenkinsBase = `
[providers.local]
type = "local"
`

func TestJenkinsTable(t *testing.T) {
	dir := t.TempDir()
	c, err := Parse(filepath.Join(dir, "hangar.toml"), []byte(jenkinsBase+`
[pools.ci]
provider = "local"
[pools.ci.jenkins]
url = "https://ci.example.com/jenkins"
user = "hangar"
token_file = "secrets/jenkins-token"
label = "hangar-linux"

[pools.own]
provider = "local"
worker_command = "my-agent"
[pools.own.jenkins]
url = "https://ci.example.com/jenkins/"
user = "hangar"
token_env = "JENKINS_TOKEN"
label = "other"
node_prefix = "own-"
remote_fs = "/srv/agent"
poll_interval = "2s"
connect_timeout = "1m"

[pools.plain]
provider = "local"
`))
	if err != nil {
		t.Fatal(err)
	}
	ci := c.Pools["ci"]
	if ci.Jenkins.TokenFile != filepath.Join(dir, "secrets/jenkins-token") {
		t.Errorf("token_file = %q, want it resolved against the config's directory", ci.Jenkins.TokenFile)
	}
	if ci.Bootstrap != "builtin:jenkins-agent.sh" || ci.WorkerCommand != scripts.DefaultWorkerCommand("jenkins-agent.sh") || ci.WorkerCommand == "" {
		t.Errorf("a jenkins pool runs bootstrap %q, worker_command %q; want the built-in Jenkins agent's", ci.Bootstrap, ci.WorkerCommand)
	}
	if own := c.Pools["own"]; own.WorkerCommand != "my-agent" || own.Bootstrap != "builtin:generic.sh" {
		t.Errorf("a pool with its own worker_command got bootstrap %q, worker_command %q", own.Bootstrap, own.WorkerCommand)
	}
	if c.Pools["plain"].WorkerCommand != "" || c.Pools["plain"].Jenkins.Enabled() {
		t.Errorf("a pool without a jenkins table got %+v", c.Pools["plain"])
	}

	got := ci.Jenkins.WithDefaults("ci")
	want := Jenkins{URL: "https://ci.example.com/jenkins/", User: "hangar", TokenFile: ci.Jenkins.TokenFile, Label: "hangar-linux",
		NodePrefix: "hangar-ci-", RemoteFS: DefaultJenkinsRemoteFS, PollInterval: Duration{DefaultJenkinsPollInterval},
		ConnectTimeout: Duration{DefaultJenkinsConnectTimeout}}
	if got != want {
		t.Errorf("with defaults %+v\nwant %+v", got, want)
	}
	own := c.Pools["own"].Jenkins.WithDefaults("own")
	if own.NodePrefix != "own-" || own.RemoteFS != "/srv/agent" || own.PollInterval.Duration != 2*time.Second || own.ConnectTimeout.Duration != time.Minute {
		t.Errorf("set values replaced by defaults: %+v", own)
	}
}

func TestJenkinsProblems(t *testing.T) {
	long := strings.Repeat("p", 50)
	_, err := Parse("hangar.toml", []byte(jenkinsBase+`
[pools.a]
provider = "local"
[pools.a.jenkins]
url = "http://ci.example.com/"
token = "inline-secret"
label = "linux && docker"
node_prefix = "-x"
remote_fs = "relative"
poll_interval = "-1s"

[pools.b]
provider = "local"
[pools.b.jenkins]
url = "https://u:p@ci.example.com/"
user = "x"
token_env = "A"
token_file = "f"
label = "l"

[pools.c]
provider = "local"
[pools.c.jenkins]
url = "https://ci.example.com"
user = "x"
token_env = "A"
label = "l"

[pools.e]
provider = "local"
[pools.e.jenkins]
url = "https://ci.example.com/"
user = "x"
token_env = "A"
label = "l"

[pools.d]
provider = "local"
[pools.d.jenkins]
url = "ftp://ci"
user = "x"

[pools.`+long+`]
provider = "local"
[pools.`+long+`.jenkins]
url = "https://other.example.com/"
user = "x"
token_env = "A"
label = "l"
`))
	if err == nil {
		t.Fatal("bad jenkins tables accepted")
	}
	want := `hangar.toml:7: pools.a.jenkins: user is required
hangar.toml:8: pools.a.jenkins.url: http:// is only allowed for a loopback host; use https://
hangar.toml:9: pools.a.jenkins.token: an inline API token is not accepted; use token_env or token_file
hangar.toml:10: pools.a.jenkins.label: must be one plain Jenkins label (letters, digits, '.', '_' or '-', at most 128), not "linux && docker"
hangar.toml:11: pools.a.jenkins.node_prefix: must be letters, digits, '.', '_' or '-', starting with a letter or digit, not "-x"
hangar.toml:12: pools.a.jenkins.remote_fs: must be an absolute path, not "relative"
hangar.toml:13: pools.a.jenkins.poll_interval: must not be negative
hangar.toml:17: pools.b.jenkins: set only one of token_env or token_file
hangar.toml:18: pools.b.jenkins.url: must not hold credentials; use user and token_env or token_file
hangar.toml:38: pools.e.jenkins.label: pool c already has label l on https://ci.example.com/
hangar.toml:42: pools.d.jenkins: one of token_env or token_file is required
hangar.toml:42: pools.d.jenkins: label is required
hangar.toml:43: pools.d.jenkins.url: must be the controller's http:// or https:// root URL, not "ftp://ci"
hangar.toml:48: pools.` + long + `.jenkins: the default node_prefix "hangar-` + long + `-" is over 55 characters; set a shorter node_prefix`
	if err.Error() != want {
		t.Errorf("problems:\n%s\nwant:\n%s", err, want)
	}
	if strings.Contains(err.Error(), "inline-secret") {
		t.Error("the message shows the inline token")
	}
}

func TestJenkinsAPIToken(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	if err := os.WriteFile(file, []byte("file-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HANGAR_TEST_JENKINS_TOKEN", "env-token")
	tests := []struct {
		j       Jenkins
		want    string
		wantErr string
	}{
		{Jenkins{TokenEnv: "HANGAR_TEST_JENKINS_TOKEN"}, "env-token", ""},
		{Jenkins{TokenFile: file}, "file-token", ""},
		{Jenkins{TokenEnv: "HANGAR_TEST_UNSET_VARIABLE"}, "", "environment variable HANGAR_TEST_UNSET_VARIABLE is not set or empty"},
		{Jenkins{TokenFile: filepath.Join(dir, "missing")}, "", "reading token_file"},
		{Jenkins{Token: "inline"}, "", "neither token_env nor token_file is set"},
	}
	for _, tt := range tests {
		got, err := tt.j.APIToken()
		if got != tt.want || (err == nil) != (tt.wantErr == "") || err != nil && !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%+v: %q, %v; want %q, %q", tt.j, got, err, tt.want, tt.wantErr)
		}
	}
	if s := (Jenkins{URL: "u", User: "x", Token: "inline-secret"}).String(); strings.Contains(s, "inline-secret") {
		t.Errorf("String() shows the token: %s", s)
	}
}
