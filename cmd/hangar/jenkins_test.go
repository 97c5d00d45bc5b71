package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/ci/jenkins"
	"github.com/hangar-ci/hangar/ci/jenkins/jenkinstest"
	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

const (
	jenkinsUser  = "hangar"
	jenkinsToken = "11d0e1e2f3a4b5c6d7e8f9a0b1c2d3e4f5"
	jenkinsLabel = "hangar-linux"
	jenkinsIdle  = 2 * time.Second
)

// jenkinsTOML is one local pool served to the controller at url, with the
// API token in tokenFile.
func jenkinsTOML(dataDir, url, tokenFile string) string {
	return fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[providers.local]
type = "local"

[pools.ci]
provider = "local"
max_instances = 2
idle_ttd = %q
boot_timeout = "2m"

[pools.ci.jenkins]
url = %q
user = %q
token_file = %q
label = %q
poll_interval = "200ms"
connect_timeout = "2m"
`, dataDir, jenkinsIdle, url, jenkinsUser, tokenFile, jenkinsLabel)
}

// agentProcs finds the live agents (java -jar …agent.jar) among the
// processes of instance id.
func agentProcs(id string) []string {
	var out []string
	for _, pid := range instanceProcs(id) {
		cmdline, _ := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
		if bytes.Contains(cmdline, []byte("agent.jar\x00")) {
			out = append(out, pid)
		}
	}
	return out
}

// The whole path on the local cloud: a build waits for the pool's label;
// `hangar jenkins` creates a node and leases an instance, whose
// jenkins-agent.sh downloads agent.jar from the controller (a fake one that
// really connects) and runs it with the node's name and secret; the build
// runs and its node is never deleted while it does; a restarted watcher
// adopts the node; once idle for idle_ttd the node is deleted, the agent
// stopped and the instance released. A build for another label gets
// nothing.
func TestJenkinsEndToEnd(t *testing.T) {
	jar := jenkinstest.AgentJar(t)
	srv := jenkinstest.New(jenkinstest.Options{User: jenkinsUser, Token: jenkinsToken, AgentJar: jar})
	defer srv.Close()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "jenkins-token")
	writeFile(t, tokenFile, jenkinsToken+"\n")
	ts := startTest(t, jenkinsTOML(filepath.Join(dir, "data"), srv.URL, tokenFile), nil)
	pools, err := jenkinsPools(context.Background(), ts.cfg, ts.log)
	if err != nil {
		t.Fatal(err)
	}
	j, err := startJenkins(ts.server, pools)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { j.Close() }()

	srv.Enqueue("windows-build", "windows", false)
	srv.Enqueue("linux-build", jenkinsLabel, true)
	var node jenkinstest.Node
	testutil.Eventually(t, "a node to run the build", 90*time.Second, func() bool {
		nodes := srv.Nodes()
		if len(nodes) == 1 {
			node = nodes[0]
		}
		return node.Build != ""
	})
	if node.Build != "linux-build #1" || !node.Connected || !slices.Equal(node.Labels, []string{jenkinsLabel}) {
		t.Fatalf("node %+v", node)
	}
	secret := srv.Secret(node.Name)
	var instance pool.InstanceView
	for _, in := range ts.instances(t, "ci") {
		if in.State == pool.Leased {
			instance = in
		}
	}
	if instance.ID == "" {
		t.Fatalf("no leased instance: %+v", ts.instances(t, "ci"))
	}

	// How the agent was started: every option from the assignment, the
	// secret from a private file and never on the command line.
	args := node.AgentArgs
	i := slices.Index(args, "-secret")
	if i < 0 || i+1 >= len(args) || !strings.HasPrefix(args[i+1], "@") {
		t.Fatalf("agent args %q: no -secret @FILE", args)
	}
	workDir := filepath.Join(ts.dataDir, "local", "instances", instance.ID, "disk", "var", "lib", "jenkins-agent")
	want := []string{"-url", srv.URL, "-name", node.Name, "-secret", args[i+1], "-webSocket", "-workDir", workDir}
	if !slices.Equal(args, want) {
		t.Errorf("agent args\n%q\nwant\n%q", args, want)
	}
	if node.SecretFileMode != "rw-------" {
		t.Errorf("secret file mode %q, want rw-------", node.SecretFileMode)
	}
	if slices.Contains(args, secret) {
		t.Error("the secret is on the agent's command line")
	}
	if _, err := os.Stat(filepath.Join(workDir, "remoting")); err != nil {
		t.Errorf("the agent's work directory: %v", err)
	}

	// A long build: the node stays however long it idles on paper.
	started := time.Now()
	testutil.Eventually(t, "idle_ttd to pass", 30*time.Second, func() bool { return time.Since(started) > 2*jenkinsIdle })
	polls := srv.Hits("GET /queue/api/json")
	testutil.Eventually(t, "three more polls", 30*time.Second, func() bool { return srv.Hits("GET /queue/api/json") >= polls+3 })
	if n, ok := srv.Node(node.Name); !ok || n.Build == "" || n.TemporarilyOffline {
		t.Fatalf("busy node: %+v, %v", n, ok)
	}

	// A restarted watcher finds the node and its lease, and makes no other.
	j.Close()
	j, err = startJenkins(ts.server, pools)
	if err != nil {
		t.Fatal(err)
	}
	polls = srv.Hits("GET /queue/api/json")
	testutil.Eventually(t, "the new watcher's polls", 30*time.Second, func() bool { return srv.Hits("GET /queue/api/json") >= polls+3 })
	if got := srv.Hits("POST /computer/doCreateItem"); got != 1 {
		t.Errorf("%d nodes created, want 1 (none for the other label, none again after a restart)", got)
	}
	if n := ts.countState(t, "ci", pool.Leased); n != 1 {
		t.Errorf("%d instances leased after the restart, want 1", n)
	}

	srv.FinishBuild(node.Name)
	testutil.Eventually(t, "the idle node to be deleted", 60*time.Second, func() bool {
		_, ok := srv.Node(node.Name)
		return !ok
	})
	testutil.Eventually(t, "the instance to be released", 60*time.Second, func() bool { return ts.countState(t, "ci", pool.Leased) == 0 })
	testutil.Eventually(t, "the agent to stop", 30*time.Second, func() bool { return len(agentProcs(instance.ID)) == 0 })
	secretFile := strings.TrimPrefix(args[i+1], "@")
	testutil.Eventually(t, "the secret's file to be removed", 30*time.Second, func() bool {
		_, err := os.Stat(secretFile)
		return os.IsNotExist(err)
	})
	if srv.Queued() != 1 {
		t.Errorf("%d builds queued, want the one for another label", srv.Queued())
	}
	if strings.Contains(ts.logs.String(), secret) || strings.Contains(ts.logs.String(), jenkinsToken) {
		t.Error("the server log shows a secret")
	}
	console, err := ts.client.Console(context.Background(), instance.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"hangar-jenkins-agent: using /", "hangar-jenkins-agent: downloaded agent.jar", "hangar-jenkins-agent: connecting node " + node.Name, "fake agent: " + node.Name + " connected"} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	if strings.Contains(console, secret) {
		t.Error("the console shows the secret")
	}
}

// A controller that refuses the token stops `hangar jenkins` at once, with
// a message that says so and names the pool, and without the token.
func TestJenkinsAuthFailure(t *testing.T) {
	srv := jenkinstest.New(jenkinstest.Options{User: jenkinsUser, Token: jenkinsToken})
	defer srv.Close()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "jenkins-token")
	writeFile(t, tokenFile, "an-old-revoked-token\n")
	cfg := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfg, jenkinsTOML(filepath.Join(dir, "data"), srv.URL, tokenFile))

	var stdout, stderr bytes.Buffer
	code := run([]string{"jenkins", "--config", cfg}, &stdout, &stderr)
	if _, err := os.Stat(filepath.Join(dir, "data")); !os.IsNotExist(err) {
		t.Errorf("the server started for a controller that refuses the token: %v", err)
	}
	want := "hangar: jenkins " + srv.URL + ` for pool ci: checking the credentials: HTTP 401: user "hangar" or its API token was refused (Error 401 Invalid password/token for user: hangar)`
	if code != 1 || !strings.Contains(stderr.String(), want+"\n") {
		t.Errorf("exit code %d, stderr:\n%s\nwant it to end with:\n%s", code, stderr.String(), want)
	}
	if strings.Contains(stderr.String(), "an-old-revoked-token") {
		t.Error("the message shows the token")
	}
}

func TestJenkinsWithoutJenkinsPools(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfg, testTOML(filepath.Join(dir, "data"), "plain", ""))
	var stdout, stderr bytes.Buffer
	if code := run([]string{"jenkins", "--config", cfg}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "no pool has a [pools.NAME.jenkins] table") {
		t.Errorf("exit code %d, stderr:\n%s", code, stderr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "data")); !os.IsNotExist(err) {
		t.Errorf("the server started: %v", err)
	}
}

// A [pools.NAME.jenkins] table maps to the watcher's Config field for
// field, and the table's defaults are the watcher's own.
func TestJenkinsConfigMapping(t *testing.T) {
	bare := configs.Jenkins{URL: "https://ci.example.com", User: "u", TokenEnv: "T", Label: "l"}
	if got, want := jenkinsConfig("ci", bare), (jenkins.Config{URL: bare.URL, User: "u", Label: "l"}).WithDefaults("ci"); got != want {
		t.Errorf("defaults: jenkinsConfig = %+v, want %+v", got, want)
	}
	full := configs.Jenkins{URL: "https://ci.example.com/", User: "u", TokenFile: "/t", Label: "l", NodePrefix: "n-", RemoteFS: "/fs",
		PollInterval: configs.Duration{Duration: time.Second}, ConnectTimeout: configs.Duration{Duration: time.Minute}}
	want := jenkins.Config{URL: full.URL, User: "u", Label: "l", NodePrefix: "n-", RemoteFS: "/fs", PollInterval: time.Second, ConnectTimeout: time.Minute}
	if got := jenkinsConfig("ci", full); got != want {
		t.Errorf("jenkinsConfig = %+v, want %+v", got, want)
	}
}
