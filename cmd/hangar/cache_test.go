package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
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
}
