package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

const cacheTOML = `
[pools.demo.cache]
volume = "deps"
size_gb = 1
keep = 1
`

// cacheSnapshots lists the snapshots of the demo pool's cache, newest first.
func cacheSnapshots(t *testing.T, ts *testServer) []cloud.Snapshot {
	t.Helper()
	st, ok := cloud.StorageOf(ts.localProvider(t))
	if !ok {
		t.Fatal("the local provider has no storage")
	}
	snaps, err := st.Snapshots(context.Background(), cloud.Filter{Tags: map[string]string{pool.TagCache: "deps"}})
	if err != nil {
		t.Fatal(err)
	}
	return snaps
}

// cacheVolumes lists the volumes of the demo pool's cache.
func cacheVolumes(t *testing.T, ts *testServer) []cloud.Volume {
	t.Helper()
	st, _ := cloud.StorageOf(ts.localProvider(t))
	vols, err := st.Volumes(context.Background(), cloud.Filter{Tags: map[string]string{pool.TagCache: "deps"}})
	if err != nil {
		t.Fatal(err)
	}
	return vols
}

// A build cache outlives its instances: what a discarded instance wrote in
// HANGAR_CACHE_DIR is there at boot on the next new instance, each end
// snapshots the cache, keep prunes older snapshots, and the volumes of
// ended instances are deleted.
func TestCacheOutlivesInstances(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1\n"+cacheTOML), nil)
	srv := "--server=" + ts.url

	// A first instance, blank cache: it writes there and fails, so
	// --discard-on-failure ends it, and its cache is snapshotted first.
	code, stdout, stderr := runCLI(t, srv, "run", "demo", "--discard-on-failure", "--", "sh", "-c",
		`echo "dir=$HANGAR_CACHE_DIR"; ls -A "$HANGAR_CACHE_DIR"; echo one > "$HANGAR_CACHE_DIR/first"; exit 1`)
	if code != 1 || !strings.HasSuffix(strings.TrimSpace(stdout), "/cache") {
		t.Fatalf("first run: exit %d, stdout %q (want the cache dir, empty); stderr:\n%s", code, stdout, stderr)
	}
	first := find(t, instanceInNote, stderr)
	waitGone(t, ts, first)
	snaps := cacheSnapshots(t, ts)
	if len(snaps) != 1 || snaps[0].State != cloud.SnapshotCompleted || snaps[0].Tags["hangar:instance"] != first {
		t.Fatalf("after the first instance's end: snapshots %+v, want one completed from %s", snaps, first)
	}

	// A second instance starts from that snapshot; it adds a file and ends
	// too. keep = 1: the first snapshot goes once the second is taken.
	code, stdout, stderr = runCLI(t, srv, "run", "demo", "--discard-on-failure", "--", "sh", "-c",
		`cat "$HANGAR_CACHE_DIR/first"; echo two > "$HANGAR_CACHE_DIR/second"; exit 1`)
	if code != 1 || stdout != "one\n" {
		t.Fatalf("second run: exit %d, stdout %q, want the first instance's file; stderr:\n%s", code, stdout, stderr)
	}
	second := find(t, instanceInNote, stderr)
	if second == first {
		t.Fatalf("the second run ran on the discarded instance %s", first)
	}
	waitGone(t, ts, second)
	testutil.Eventually(t, "the older snapshot to be pruned", 30*time.Second, func() bool {
		snaps = cacheSnapshots(t, ts)
		return len(snaps) == 1 && snaps[0].Tags["hangar:instance"] == second
	})

	code, stdout, stderr = runCLI(t, srv, "run", "demo", "--", "sh", "-c", `cat "$HANGAR_CACHE_DIR/first" "$HANGAR_CACHE_DIR/second"`)
	if code != 0 || stdout != "one\ntwo\n" {
		t.Fatalf("third run: exit %d, stdout %q; stderr:\n%s", code, stdout, stderr)
	}
	third := find(t, instanceInNote, stderr)
	// Only the live instance's volume is left.
	testutil.Eventually(t, "the ended instances' volumes to be deleted", 30*time.Second, func() bool {
		vols := cacheVolumes(t, ts)
		return len(vols) == 1 && vols[0].InstanceID == third
	})
	if m := scrape(t, ts.url); !strings.Contains(m, `hangar_cache_volumes{pool="demo"} 1`+"\n") {
		t.Errorf("hangar_cache_volumes is not 1:\n%s", grepLines(m, "hangar_cache"))
	}
}

// failingSnapshots is the local cloud with CreateSnapshot failing while
// fail is set.
type failingSnapshots struct {
	*local.Provider
	fail atomic.Bool
}

func (f *failingSnapshots) CreateSnapshot(ctx context.Context, volumeID, description string, tags map[string]string) (cloud.Snapshot, error) {
	if f.fail.Load() {
		return cloud.Snapshot{}, errors.New("injected: the snapshot failed midway")
	}
	return f.Provider.CreateSnapshot(ctx, volumeID, description, tags)
}

// A snapshot that fails leaves the previous one current, ends the instance
// all the same (its volume deleted), is counted, and the pool goes on.
func TestCacheSnapshotFailureKeepsThePrevious(t *testing.T) {
	dataDir := t.TempDir()
	lp, err := local.New(context.Background(), local.Options{Dir: filepath.Join(dataDir, "local")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lp.Close() })
	prov := &failingSnapshots{Provider: lp}
	ts := startTestWith(t, testTOML(dataDir, "demo", "max_instances = 1\n"+cacheTOML), serveOptions{Providers: map[string]cloud.Provider{"local": prov}})
	srv := "--server=" + ts.url

	_, _, stderr := runCLI(t, srv, "run", "demo", "--discard-on-failure", "--", "sh", "-c", `echo one > "$HANGAR_CACHE_DIR/first"; exit 1`)
	waitGone(t, ts, find(t, instanceInNote, stderr))
	before := cacheSnapshots(t, ts)
	if len(before) != 1 {
		t.Fatalf("snapshots after the first end: %+v", before)
	}

	prov.fail.Store(true)
	_, _, stderr = runCLI(t, srv, "run", "demo", "--discard-on-failure", "--", "sh", "-c", `echo two > "$HANGAR_CACHE_DIR/second"; exit 1`)
	waitGone(t, ts, find(t, instanceInNote, stderr))
	if after := cacheSnapshots(t, ts); len(after) != 1 || after[0].ID != before[0].ID {
		t.Fatalf("snapshots after a failed one: %+v, want only %s", after, before[0].ID)
	}
	if !strings.Contains(ts.logs.String(), "cache snapshot failed; the previous one stays current") {
		t.Error("the failed snapshot is not in the log")
	}
	metrics := scrape(t, ts.url)
	for _, want := range []string{`hangar_cache_snapshots_total{outcome="failed",pool="demo"} 1`, `hangar_cache_snapshots_total{outcome="ok",pool="demo"} 1`} {
		if !strings.Contains(metrics, want+"\n") {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(metrics, "hangar_cache"))
		}
	}

	prov.fail.Store(false)
	code, stdout, stderr := runCLI(t, srv, "run", "demo", "--", "sh", "-c", `cat "$HANGAR_CACHE_DIR/first"; ls "$HANGAR_CACHE_DIR"`)
	if code != 0 || stdout != "one\nfirst\n" {
		t.Fatalf("after the failed snapshot: exit %d, stdout %q, want the first snapshot's cache; stderr:\n%s", code, stdout, stderr)
	}
	third := find(t, instanceInNote, stderr)
	testutil.Eventually(t, "the ended instances' volumes to be deleted", 30*time.Second, func() bool {
		vols := cacheVolumes(t, ts)
		return len(vols) == 1 && vols[0].InstanceID == third
	})
}

// storedIDs lists the ids of the local cloud's volumes or snapshots under
// dir ("volumes", "snapshots") by their directories, without opening the
// cloud another process runs.
func storedIDs(t *testing.T, localDir, kind string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(localDir, "storage", kind))
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Name())
	}
	return ids
}

// kill -9 of the server while an ending instance's cache is being saved
// loses neither the instance's end nor the cache: after a restart the
// instance ends, its volume is deleted, and one snapshot is current.
func TestCacheKill9WhileSaving(t *testing.T) {
	dir := t.TempDir()
	addr := freePort(t)
	dataDir := filepath.Join(dir, "data")
	localDir := filepath.Join(dataDir, "local")
	cfg := testTOML(dataDir, "demo", "max_instances = 1\n"+cacheTOML)
	cfg = replaceOnce(cfg, `listen = "127.0.0.1:0"`, `listen = "`+addr+`"`+"\norphan_grace = \"2s\"")
	configPath := filepath.Join(dir, "hangar.toml")
	writeFile(t, configPath, cfg)
	logPath := filepath.Join(dir, "serve.log")
	t.Cleanup(func() {
		terminateAll(t, localDir)
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server log:\n%s", b)
		}
	})
	proc := serveProcess(t, configPath, addr, logPath)
	killed := false
	defer func() {
		if !killed {
			_ = proc.Process.Kill()
			_ = proc.Wait()
		}
	}()
	srv := "--server=http://" + addr

	// A cache big enough that its flush and copy take a while: the kill
	// lands in the save, not before or after it.
	code, _, stderr := runCLI(t, srv, "run", "demo", "--discard-on-failure", "--", "sh", "-c",
		`head -c 64000000 /dev/zero > "$HANGAR_CACHE_DIR/big"; echo one > "$HANGAR_CACHE_DIR/first"; exit 1`)
	if code != 1 {
		t.Fatalf("first run: exit %d; stderr:\n%s", code, stderr)
	}
	id := find(t, instanceInNote, stderr)
	during := "the snapshot's copy"
	copying := func() bool {
		tmp, _ := os.ReadDir(filepath.Join(localDir, "storage", "tmp"))
		return len(tmp) > 0
	}
	deadline := time.Now().Add(20 * time.Second)
	for !copying() {
		if time.Now().After(deadline) {
			during = "the save, the copy not seen"
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err := proc.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = proc.Wait()
	killed = true
	t.Logf("killed during %s", during)

	proc = serveProcess(t, configPath, addr, logPath)
	defer func() {
		if err := proc.Process.Signal(syscall.SIGTERM); err != nil {
			t.Error(err)
		}
		if err := proc.Wait(); err != nil {
			t.Errorf("hangar serve after SIGTERM: %v", err)
		}
	}()
	c := &api.Client{BaseURL: "http://" + addr}
	testutil.Eventually(t, id+" to end after the restart", 60*time.Second, func() bool {
		list, err := c.Instances(context.Background(), "demo")
		if err != nil {
			return false
		}
		for _, in := range list {
			if in.ID == id {
				return false
			}
		}
		return len(instanceProcs(id)) == 0
	})
	testutil.Eventually(t, "no cache volume left and one snapshot", 60*time.Second, func() bool {
		return len(storedIDs(t, localDir, "volumes")) == 0 && len(storedIDs(t, localDir, "snapshots")) == 1
	})
	// The snapshot is the instance's cache: a new instance starts from it.
	code, stdout, stderr := runCLI(t, srv, "run", "demo", "--", "sh", "-c", `cat "$HANGAR_CACHE_DIR/first"`)
	if code != 0 || stdout != "one\n" {
		t.Fatalf("the cache after the restart: exit %d, %q; stderr:\n%s", code, stdout, stderr)
	}
}

// hangar cache list, snapshot and drop, and their errors.
func TestCacheCLI(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1\n"+cacheTOML+
		"[pools.plain]\nprovider = \"local\"\nworker_command = \"sleep 600\"\n"), nil)
	srv := "--server=" + ts.url

	code, out, errOut := runCLI(t, srv, "cache", "list", "demo")
	if code != 0 || strings.TrimSpace(out) != "SNAPSHOT  STATE  CREATED  SIZE_GB  FROM" {
		t.Fatalf("list of no snapshots: %d %q %q", code, out, errOut)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"cache", "snapshot", "demo"}, "no idle instance of pool demo has served a lease"},
		{[]string{"cache", "list", "nope"}, `unknown pool "nope"`},
		{[]string{"cache", "drop", "plain"}, "pool plain has no [cache]"},
		{[]string{"cache", "snapshot"}, "accepts 1 arg(s), received 0"},
	} {
		code, _, errOut := runCLI(t, append([]string{srv}, c.args...)...)
		if code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("hangar %v: exit %d, stderr %q; want an error with %q", c.args, code, errOut, c.want)
		}
	}

	// An instance that has served a lease and is idle: its cache is
	// snapshotted where it stands, and it stays in service.
	code, _, errOut = runCLI(t, srv, "run", "demo", "--", "sh", "-c", `echo kept > "$HANGAR_CACHE_DIR/f"`)
	if code != 0 {
		t.Fatalf("run: %d %s", code, errOut)
	}
	id := find(t, instanceInNote, errOut)
	testutil.Eventually(t, id+" to be idle", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 1 })
	code, out, errOut = runCLI(t, srv, "cache", "snapshot", "demo")
	if code != 0 || !strings.Contains(out, "taken from "+id) {
		t.Fatalf("snapshot: %d %q %q", code, out, errOut)
	}
	code, out, _ = runCLI(t, srv, "cache", "list", "demo", "-o", "json")
	var snaps []pool.CacheSnapshotView
	if err := json.Unmarshal([]byte(out), &snaps); code != 0 || err != nil || len(snaps) != 1 || !snaps[0].Current || snaps[0].Instance != id || snaps[0].State != cloud.SnapshotCompleted {
		t.Fatalf("list after the snapshot: %d %v %+v", code, err, snaps)
	}
	code, out, errOut = runCLI(t, srv, "run", "demo", "--", "sh", "-c", `cat "$HANGAR_CACHE_DIR/f"`)
	if code != 0 || out != "kept\n" || find(t, instanceInNote, errOut) != id {
		t.Fatalf("run after the snapshot: %d %q %q, want it on %s still", code, out, errOut, id)
	}

	code, out, _ = runCLI(t, srv, "cache", "drop", "demo")
	if code != 0 || out != "1 snapshots of pool demo's cache deleted\n" || len(cacheSnapshots(t, ts)) != 0 {
		t.Fatalf("drop: %d %q, %d left", code, out, len(cacheSnapshots(t, ts)))
	}
}

// With refresh, an idle instance that has served a lease has its cache
// snapshotted while it lives.
func TestCacheRefresh(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1\n"+cacheTOML+"refresh = \"1s\"\n"), nil)
	code, _, errOut := runCLI(t, "--server="+ts.url, "run", "demo", "--", "sh", "-c", `echo fresh > "$HANGAR_CACHE_DIR/f"`)
	if code != 0 {
		t.Fatalf("run: %d %s", code, errOut)
	}
	id := find(t, instanceInNote, errOut)
	testutil.Eventually(t, "a refresh snapshot from "+id, 30*time.Second, func() bool {
		snaps := cacheSnapshots(t, ts)
		return len(snaps) == 1 && snaps[0].Tags["hangar:instance"] == id
	})
	if n := ts.countState(t, "demo", pool.Idle); n != 1 {
		t.Errorf("%d idle instances after the refresh, want %s still idle", n, id)
	}
	// Nothing new on it since: later periods take no more snapshots.
	first := cacheSnapshots(t, ts)[0].ID
	time.Sleep(3 * time.Second)
	if snaps := cacheSnapshots(t, ts); len(snaps) != 1 || snaps[0].ID != first {
		t.Errorf("snapshots %+v after three idle periods, want only %s", snaps, first)
	}
}

// The same cache through the EC2 provider, on ec2test whose instances and
// volumes are the local cloud's: the volume made, attached and mounted,
// snapshotted as its instance ends, and the next instance starting from it.
func TestEC2Cache(t *testing.T) {
	srv, _ := ec2Cloud(t)
	ts := startTest(t, ec2TOML(t.TempDir(), srv.URL(), "max_instances = 1\n[pools.ci.cache]\nvolume = \"deps\"\nsize_gb = 1\nkeep = 1\n"), nil)
	cli := "--server=" + ts.url
	code, stdout, stderr := runCLI(t, cli, "run", "ci", "--discard-on-failure", "--", "sh", "-c",
		`echo "$HANGAR_CACHE_DIR"; echo one > "$HANGAR_CACHE_DIR/first"; exit 1`)
	if code != 1 || !strings.HasSuffix(strings.TrimSpace(stdout), "/cache") {
		t.Fatalf("first run: exit %d, %q; stderr:\n%s", code, stdout, stderr)
	}
	first := find(t, instanceInNote, stderr)
	st, ok := cloud.StorageOf(ts.providers["east"])
	if !ok {
		t.Fatal("the EC2 provider has no storage")
	}
	tags := map[string]string{pool.TagCache: "deps"}
	testutil.Eventually(t, "the first instance's cache snapshot, and its volume gone", 60*time.Second, func() bool {
		snaps, err1 := st.Snapshots(context.Background(), cloud.Filter{Tags: tags})
		vols, err2 := st.Volumes(context.Background(), cloud.Filter{Tags: tags})
		return err1 == nil && err2 == nil && len(snaps) == 1 && snaps[0].State == cloud.SnapshotCompleted &&
			snaps[0].Tags["hangar:instance"] == first && len(vols) == 0
	})
	code, stdout, stderr = runCLI(t, cli, "run", "ci", "--", "sh", "-c", `cat "$HANGAR_CACHE_DIR/first"`)
	if code != 0 || stdout != "one\n" {
		t.Fatalf("second run: exit %d, %q; stderr:\n%s", code, stdout, stderr)
	}
	if find(t, instanceInNote, stderr) == first {
		t.Fatal("the second run ran on the discarded instance")
	}
}
