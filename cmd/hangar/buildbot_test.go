package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

// Debian's Buildbot: its entry points run /usr/bin/python3, whatever python3
// comes first on PATH.
const (
	systemPython   = "/usr/bin/python3"
	buildbotBin    = "/usr/bin/buildbot"
	buildbotWorker = "/usr/bin/buildbot-worker"
)

// requireBuildbot skips unless Debian's buildbot and buildbot-worker, and an
// HTTP client for Buildbot's httpclientservice, are installed.
func requireBuildbot(t *testing.T) {
	t.Helper()
	testutil.NeedTools(t, "a real Buildbot master leases from Hangar; apt-get install buildbot buildbot-worker", systemPython, buildbotBin, buildbotWorker)
	check := "import buildbot, buildbot_worker\ntry:\n import txrequests\nexcept ImportError:\n import treq"
	if out, err := exec.Command(systemPython, "-c", check).CombinedOutput(); err != nil {
		testutil.ToolMissing(t, "Buildbot cannot be imported (apt-get install buildbot buildbot-worker): %v\n%s", err, out)
	}
}

// TestHangarBuildbotModule checks the module under Debian's Buildbot: it
// imports, HangarLatentWorker is an AbstractLatentWorker with the
// documented signature, and bad configurations are refused with messages
// that say what is wrong.
func TestHangarBuildbotModule(t *testing.T) {
	requireBuildbot(t)
	check := `
import inspect, sys
sys.path.insert(0, sys.argv[1])
from buildbot.config.errors import capture_config_errors
from buildbot.worker import AbstractLatentWorker
from hangar_buildbot import HangarLatentWorker, parse_duration

assert issubclass(HangarLatentWorker, AbstractLatentWorker)
params = inspect.signature(HangarLatentWorker.checkConfig).parameters
for name, default in [("password", None), ("token", None), ("wait", "10m"), ("discard", False)]:
    assert params[name].default == default, (name, params[name].default)
for name in ("hangar_url", "pool"):
    assert name in params, name
assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90 and parse_duration(2.5) == 2.5

def errors(*args, **kwargs):
    with capture_config_errors(raise_on_error=False) as errs:
        HangarLatentWorker(*args, **kwargs)
    return "\n".join(errs.errors)

assert errors("w1", hangar_url="http://127.0.0.1:7878", pool="p") == "", errors("w1", hangar_url="http://127.0.0.1:7878", pool="p")
for args, kwargs, want in [
    (("w1",), {"pool": "p"}, "hangar_url must be Hangar's http:// or https:// URL, got None"),
    (("w1",), {"hangar_url": "ftp://x", "pool": "p"}, "hangar_url must be Hangar's http:// or https:// URL"),
    (("w1",), {"hangar_url": "http://h"}, "pool must name a Hangar pool"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "wait": "ten minutes"}, "wait: 'ten minutes' is not a duration"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "wait": "0s"}, "wait must be more than 0s"),
    (("w1",), {"hangar_url": "http://h", "pool": "p", "discard": "yes"}, "discard must be True or False"),
    (("_w",), {"hangar_url": "http://h", "pool": "p"}, "Hangar needs a worker name"),
]:
    got = errors(*args, **kwargs)
    assert want in got, (args, kwargs, got)
print("ok")
`
	cmd := exec.Command(systemPython, "-c", check, filepath.Join("..", "..", "ci", "buildbot"))
	cmd.Env = noBytecode()
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("checking hangar_buildbot.py: %v\n%s", err, out)
	}
}

// A Buildbot master with a HangarLatentWorker builds on instances leased
// from a local-cloud pool: the first build on a cold instance, the second on
// the same instance, warm, after the first lease was released at
// build_wait_timeout. Workers on a pool Hangar does not have, or cannot
// launch in, fail their substantiations with Hangar's message.
func TestBuildbotLatentWorker(t *testing.T) {
	requireBuildbot(t)
	const token = "tok_buildbot-e2e-0123456789"
	dir := t.TempDir()
	ts := startTestWith(t, fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[[server.tokens]]
name = "buildbot"
role = "lease"
token = %q

# A cloud's boot takes longer than a process's: cold and warm differ by it.
[providers.local]
type = "local"
boot_delay = "1s"

[pools.bb]
provider = "local"
min_idle = 0
max_instances = 2
idle_ttd = "5m"
boot_timeout = "2m"
bootstrap = "builtin:buildbot-worker.sh"
# Short, so that the worker's renewals are what keeps its leases alive.
lease_ttl = "2s"

# Its launches fail: this cloud has no such image.
[pools.broken]
provider = "local"
min_idle = 0
max_instances = 1
image = "ami-0123456789abcdef0"
bootstrap = "builtin:buildbot-worker.sh"
`, filepath.Join(dir, "hangar"), token), serveOptions{})
	ts.client.Token = token
	ctx := context.Background()

	m := startBuildbotMaster(t, filepath.Join(dir, "master"), ts.url, token)

	// Cold: the pool has no instance until the build asks for one.
	if n := len(ts.instances(t, "bb")); n != 0 {
		t.Fatalf("pool bb has %d instances before any build", n)
	}
	sent := time.Now()
	m.sendchange(t, "main", "1")
	first := m.mustSucceed(t, ts, "instance-id", 1)
	coldStart := first.started.Sub(sent)
	t.Logf("cold: sendchange to build step start %s (instance %s, lease %s)", coldStart.Round(time.Millisecond), first.instance, first.lease)

	// build_wait_timeout (3s) after the build the lease is released and the
	// instance is idle again, not discarded.
	waitReleased(t, ts, first.lease, "after build_wait_timeout")
	testutil.Eventually(t, "instance "+first.instance+" to be idle again", 30*time.Second, func() bool {
		return ts.countState(t, "bb", pool.Idle) == 1
	})
	t.Logf("lease released %s after the build finished", time.Since(first.finished).Round(time.Millisecond))
	if !strings.Contains(ts.logs.String(), "/v1/leases/"+first.lease+"/renew") {
		t.Errorf("lease %s outlived its 2s TTL without a renew", first.lease)
	}

	// Warm: the same instance, a new lease, a new password.
	sent = time.Now()
	m.sendchange(t, "main", "2")
	second := m.mustSucceed(t, ts, "instance-id", 2)
	warmStart := second.started.Sub(sent)
	t.Logf("warm: sendchange to build step start %s (instance %s, lease %s)", warmStart.Round(time.Millisecond), second.instance, second.lease)
	t.Logf("sendchange to build start: cold %s, warm %s", coldStart.Round(time.Millisecond), warmStart.Round(time.Millisecond))
	if second.instance != first.instance {
		t.Errorf("second build ran on %s, want the warm instance %s", second.instance, first.instance)
	}
	if second.lease == first.lease || second.password == first.password {
		t.Errorf("second build reused lease %s or its password; want a new lease and password", first.lease)
	}

	// A build that breaks its worker (it dies mid-build) gets the
	// instance discarded; Buildbot retries the build on a new one.
	m.sendchange(t, "break", "3")
	if b := m.waitBuild(t, ts, "breaker", 1); b.results == nil || *b.results == 0 {
		t.Fatalf("the build that killed its worker finished with results %v; want a failure", b.results)
	}
	third := m.mustSucceed(t, ts, "breaker", 2)
	if third.instance == second.instance {
		t.Errorf("the retried build ran on %s, the instance whose worker died", third.instance)
	}
	testutil.Eventually(t, "instance "+second.instance+", whose worker died, to be discarded", 30*time.Second, func() bool {
		for _, in := range ts.instances(t, "bb") {
			if in.ID == second.instance {
				return in.State == pool.Terminating
			}
		}
		return true
	})
	if !strings.Contains(ts.logs.String(), "lease="+second.lease+" state=released discard=true") {
		t.Errorf("lease %s was not released with discard", second.lease)
	}

	// Workers whose pool Hangar does not have, or cannot launch in, fail
	// their substantiations with Hangar's message. (Not earlier: Buildbot
	// starts no other build while a substantiation waits.)
	m.sendchange(t, "nopool", "3")
	m.sendchange(t, "broken", "3")
	for _, want := range []string{
		`leasing an instance of pool missing: unknown pool "missing"`,
		`leasing an instance of pool broken: no instance within 1s; the pool's last launch error: `,
	} {
		testutil.Eventually(t, "the failed substantiation in the master's log", 60*time.Second, func() bool {
			return strings.Contains(m.log(), want)
		})
	}

	// A master that stops releases its lease.
	m.stop(t)
	waitReleased(t, ts, third.lease, "by the master's stop")
	testutil.Eventually(t, "instance "+third.instance+" to be idle after the master stopped", 30*time.Second, func() bool {
		return ts.countState(t, "bb", pool.Idle) == 1
	})
	// A lease that waited in vain was canceled, not left to take an
	// instance later.
	pools, err := ts.client.Pools(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pools {
		if p.LeasesPending != 0 || p.Name == "broken" && p.LaunchError == "" {
			t.Errorf("pool %s after the master stopped: %d pending leases, launch error %q", p.Name, p.LeasesPending, p.LaunchError)
		}
	}

	// No password in a log, a console, a file of the instance (buildbot.tac
	// reads it from the environment) or a command line.
	for _, pw := range []string{first.password, second.password, third.password} {
		if strings.Contains(ts.logs.String(), pw) || strings.Contains(m.log(), pw) {
			t.Error("a worker password is in Hangar's or the master's log")
		}
		// The func never fails the walk: what cannot be read is skipped.
		_ = filepath.Walk(filepath.Join(ts.dataDir, "local", "instances"), func(path string, info os.FileInfo, err error) error {
			if err == nil && !info.IsDir() {
				if b, _ := os.ReadFile(path); bytes.Contains(b, []byte(pw)) {
					t.Errorf("a worker password is in %s", path)
				}
			}
			return nil
		})
	}
	for _, args := range first.cmdlines {
		if strings.Contains(args, first.password) {
			t.Errorf("the worker password is in a command line: %q", args)
		}
	}
	if strings.Contains(m.log(), token) {
		t.Error("the Hangar token is in the master's log")
	}
}

// waitReleased waits for lease id to be released by its holder; any other
// end (expired: no renew; lost: the instance died) fails at once.
func waitReleased(t *testing.T, ts *testServer, id, when string) {
	t.Helper()
	testutil.Eventually(t, "lease "+id+" to be released "+when, 60*time.Second, func() bool {
		l, err := ts.client.GetLease(context.Background(), id, 0)
		if err != nil {
			t.Fatalf("reading lease %s: %v", id, err)
		}
		if l.State != pool.LeaseActive && l.State != pool.LeaseReleased {
			t.Fatalf("lease %s is %s, want released %s", id, l.State, when)
		}
		return l.State == pool.LeaseReleased
	})
}

// noBytecode is the environment for Pythons that import
// ci/buildbot/hangar_buildbot.py: a test writes nothing into the tree.
func noBytecode() []string {
	return append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
}

type buildbotMaster struct {
	dir  string
	addr string // of the worker (pb) port, where sendchange goes too
	cmd  *exec.Cmd
	done chan error
}

// startBuildbotMaster creates a master in dir whose HangarLatentWorkers
// lease from the Hangar at hangarURL, starts it in the foreground and stops
// it when the test ends.
func startBuildbotMaster(t *testing.T, dir, hangarURL, token string) *buildbotMaster {
	t.Helper()
	if out, err := exec.Command(buildbotBin, "create-master", "-q", "--db", "sqlite:///state.sqlite", dir).CombinedOutput(); err != nil {
		t.Fatalf("buildbot create-master: %v\n%s", err, out)
	}
	// sendchange must know the port before the master starts.
	m := &buildbotMaster{dir: dir, addr: freePort(t), done: make(chan error, 1)}
	_, port, _ := net.SplitHostPort(m.addr)
	scriptsDir, err := filepath.Abs(filepath.Join("..", "..", "ci", "buildbot"))
	if err != nil {
		t.Fatal(err)
	}
	py := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	cfg := fmt.Sprintf(`# The end-to-end test's master (cmd/hangar/buildbot_test.go).
import shlex, sys
sys.path.insert(0, %s)
from buildbot.plugins import changes, schedulers, steps, util
from hangar_buildbot import HangarLatentWorker

c = BuildmasterConfig = {}
c['buildbotNetUsageData'] = None
c['title'] = 'hangar-e2e'
c['buildbotURL'] = 'http://127.0.0.1/'
c['db'] = {'db_url': 'sqlite:///state.sqlite'}
c['logCompressionMethod'] = 'raw'
c['protocols'] = {'pb': {'port': 'tcp:%s:interface=127.0.0.1'}}
c['change_source'] = [changes.PBChangeSource(user='change', passwd='changepw')]

hangar = dict(hangar_url=%s, token=%s, wait='60s', masterFQDN='127.0.0.1', missing_timeout=60)
c['workers'] = [
    HangarLatentWorker('hangar-bb', pool='bb', build_wait_timeout=3, **hangar),
    HangarLatentWorker('hangar-missing', pool='missing', **hangar),
    HangarLatentWorker('hangar-broken', pool='broken', **dict(hangar, wait='1s')),
]

# The step prints when it ran and the instance id from the metadata service
# (IMDSv2), the way a build on EC2 would ask.
script = r'''
started=$(date +%%s.%%N)
token=$(curl -sfS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$HANGAR_METADATA_URL/latest/api/token")
id=$(curl -sfS -H "X-aws-ec2-metadata-token: $token" "$HANGAR_METADATA_URL/latest/meta-data/instance-id")
echo "hangar-e2e started=$started instance=$id lease=$HANGAR_LEASE_ID"
test -n "$id"
'''
factory = util.BuildFactory([steps.ShellCommand(name='instance-id', command=['bash', '-c', script], haltOnFailure=True)])
# The first build of this one kills its worker (the step's parent).
breaker = 'if mkdir ' + shlex.quote(%s) + ' 2>/dev/null; then kill -9 $PPID; sleep 60; fi' + script
breaker_factory = util.BuildFactory([steps.ShellCommand(name='instance-id', command=['bash', '-c', breaker], haltOnFailure=True)])
c['builders'] = [
    util.BuilderConfig(name='instance-id', workernames=['hangar-bb'], factory=factory),
    util.BuilderConfig(name='breaker', workernames=['hangar-bb'], factory=breaker_factory),
    util.BuilderConfig(name='no-pool', workernames=['hangar-missing'], factory=factory),
    util.BuilderConfig(name='broken-pool', workernames=['hangar-broken'], factory=factory),
]
c['schedulers'] = [
    schedulers.AnyBranchScheduler(name='main', treeStableTimer=None, builderNames=['instance-id'],
                                  change_filter=util.ChangeFilter(branch='main')),
    schedulers.AnyBranchScheduler(name='break', treeStableTimer=None, builderNames=['breaker'],
                                  change_filter=util.ChangeFilter(branch='break')),
    schedulers.AnyBranchScheduler(name='nopool', treeStableTimer=None, builderNames=['no-pool'],
                                  change_filter=util.ChangeFilter(branch='nopool')),
    schedulers.AnyBranchScheduler(name='broken', treeStableTimer=None, builderNames=['broken-pool'],
                                  change_filter=util.ChangeFilter(branch='broken')),
]
`, py(scriptsDir), port, py(hangarURL), py(token), py(filepath.Join(dir, "broken-once")))
	writeFile(t, filepath.Join(dir, "master.cfg"), cfg)

	logFile, err := os.Create(filepath.Join(dir, "stdout.log"))
	if err != nil {
		t.Fatal(err)
	}
	m.cmd = exec.Command(buildbotBin, "start", "--nodaemon", dir)
	m.cmd.Env = noBytecode()
	m.cmd.Stdout, m.cmd.Stderr = logFile, logFile
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("starting the buildbot master: %v", err)
	}
	if err := logFile.Close(); err != nil { // the child has its own copy
		t.Fatal(err)
	}
	go func() { m.done <- m.cmd.Wait() }()
	t.Cleanup(func() {
		m.stop(t)
		if t.Failed() {
			t.Logf("master twistd.log:\n%s", m.log())
			workerLogs, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), "hangar", "local", "instances", "*", "disk", "buildbot-worker", "*", "twistd.log"))
			for _, p := range workerLogs {
				b, _ := os.ReadFile(p)
				t.Logf("%s:\n%s", p, b)
			}
		}
	})
	testutil.Eventually(t, "the buildbot master to listen", 60*time.Second, func() bool {
		select {
		case err := <-m.done:
			m.done <- err
			b, _ := os.ReadFile(filepath.Join(dir, "stdout.log"))
			t.Fatalf("the buildbot master exited: %v\n%s\n%s", err, b, m.log())
		default:
		}
		c, err := net.Dial("tcp", m.addr)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	})
	return m
}

// stop ends the master as `buildbot stop` does, with SIGTERM, and its
// whole process group with SIGKILL if it is not gone in 30s.
func (m *buildbotMaster) stop(t *testing.T) {
	t.Helper()
	if m.cmd == nil {
		return
	}
	pgid := m.cmd.Process.Pid
	m.cmd = nil
	_ = syscall.Kill(-pgid, syscall.SIGTERM) // ESRCH: gone already, which m.done says
	select {
	case err := <-m.done:
		if err != nil {
			t.Logf("the buildbot master exited: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("the buildbot master did not stop within 30s of SIGTERM")
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		t.Logf("the buildbot master exited: %v", <-m.done)
	}
	// Anything it left in its group goes too (ESRCH: nothing left).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

func (m *buildbotMaster) log() string {
	b, _ := os.ReadFile(filepath.Join(m.dir, "twistd.log"))
	return string(b)
}

func (m *buildbotMaster) sendchange(t *testing.T, branch, revision string) {
	t.Helper()
	out, err := exec.Command(buildbotBin, "sendchange", "--master", m.addr,
		"--auth", "change:changepw", "--who", "hangar-test", "--branch", branch, "--revision", revision,
		"--comments", "hangar e2e", "file.txt").CombinedOutput()
	if err != nil {
		t.Fatalf("buildbot sendchange: %v\n%s", err, out)
	}
}

type buildbotBuild struct {
	instance, lease, password string
	started, finished         time.Time
	results                   *int
	log                       string
	cmdlines                  []string // of the instance's processes while leased
}

// buildsQuery prints the master's builds with their step logs as JSON.
const buildsQuery = `
import json, sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True, timeout=10)
rows = db.execute("""
    SELECT b.id, bl.name, b.number, b.results, b.complete_at
    FROM builds b JOIN builders bl ON bl.id = b.builderid ORDER BY b.id""").fetchall()
out = []
for bid, builder, number, results, complete_at in rows:
    chunks = db.execute("""
        SELECT lc.content FROM steps s JOIN logs l ON l.stepid = s.id
        JOIN logchunks lc ON lc.logid = l.id WHERE s.buildid = ? ORDER BY l.id, lc.first_line""", (bid,)).fetchall()
    log = "".join(c[0].decode() if isinstance(c[0], bytes) else c[0] for c in chunks)
    out.append(dict(builder=builder, number=number, results=results, complete=complete_at is not None, log=log))
print(json.dumps(out))
`

type buildRow struct {
	Builder  string `json:"builder"`
	Number   int    `json:"number"`
	Results  *int   `json:"results"`
	Complete bool   `json:"complete"`
	Log      string `json:"log"`
}

func (m *buildbotMaster) builds(t *testing.T) []buildRow {
	t.Helper()
	out, err := exec.Command(systemPython, "-c", buildsQuery, filepath.Join(m.dir, "state.sqlite")).Output()
	if err != nil {
		t.Fatalf("reading the master's builds: %v", err)
	}
	var rows []buildRow
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("reading the master's builds: %v\n%s", err, out)
	}
	return rows
}

// waitBuild waits for build number n of builder to finish and returns
// where and when it ran. It notes the command lines of the instance's
// processes while the build's step runs.
func (m *buildbotMaster) waitBuild(t *testing.T, ts *testServer, builder string, n int) buildbotBuild {
	t.Helper()
	var b buildbotBuild
	var row buildRow
	// Not waitFor: each look at the builds starts a python, so look less
	// often than it polls.
	for deadline := time.Now().Add(120 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for build %d of %s to finish", n, builder)
		}
		for _, r := range m.builds(t) {
			if r.Builder == builder && r.Number == n {
				row = r
			}
		}
		if b.cmdlines == nil && strings.Contains(row.Log, " instance=") {
			b.cmdlines = []string{}
			for _, pid := range instanceProcs(instanceOfLog(row.Log)) {
				if c, err := os.ReadFile("/proc/" + pid + "/cmdline"); err == nil {
					b.cmdlines = append(b.cmdlines, string(bytes.ReplaceAll(c, []byte{0}, []byte{' '})))
				}
			}
		}
		if row.Complete {
			break
		}
	}
	b.finished = time.Now()
	b.results, b.log = row.Results, row.Log
	fields := map[string]string{}
	for _, line := range strings.Split(row.Log, "\n") {
		if _, rest, ok := strings.Cut(line, "hangar-e2e "); ok {
			for _, f := range strings.Fields(rest) {
				k, v, _ := strings.Cut(f, "=")
				fields[k] = v
			}
		}
	}
	if row.Results == nil || *row.Results != 0 {
		return b
	}
	secs, err := strconv.ParseFloat(fields["started"], 64)
	if err != nil || !strings.HasPrefix(fields["instance"], "i-") || fields["lease"] == "" {
		t.Fatalf("build %d of %s printed no start time, instance id or lease; its log:\n%s", n, builder, row.Log)
	}
	b.started = time.Unix(0, int64(secs*1e9))
	b.instance, b.lease = fields["instance"], fields["lease"]
	l, err := ts.client.GetLease(context.Background(), b.lease, 0)
	if err != nil {
		t.Fatalf("build %d of %s ran under lease %s: %v", n, builder, b.lease, err)
	}
	b.password = l.Worker.Password
	if l.Instance != nil && l.Instance.ID != b.instance {
		t.Errorf("build %d of %s ran on %s under lease %s of instance %s", n, builder, b.instance, b.lease, l.Instance.ID)
	}
	return b
}

// mustSucceed is waitBuild for a build that must succeed.
func (m *buildbotMaster) mustSucceed(t *testing.T, ts *testServer, builder string, n int) buildbotBuild {
	t.Helper()
	b := m.waitBuild(t, ts, builder, n)
	if b.results == nil || *b.results != 0 {
		t.Fatalf("build %d of %s finished with results %v, want 0 (success); its log:\n%s", n, builder, b.results, b.log)
	}
	return b
}

func instanceOfLog(log string) string {
	_, rest, _ := strings.Cut(log, " instance=")
	id, _, _ := strings.Cut(rest, " ")
	return id
}
