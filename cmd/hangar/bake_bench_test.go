package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// Run with: go test -run '^$' -bench ColdLeaseBake -benchtime 5x ./cmd/hangar
//
// BenchmarkColdLeaseBake: a pool whose worker installs something slow
// when it is missing (as buildbot-worker.sh installs buildbot-worker),
// here 3 s of it, measured from a lease's request on an empty pool to its
// worker running, b.N times before `hangar image bake` (whose script
// installs it) and b.N times after. Reports before-s and after-s per
// lease and after/before.
func BenchmarkColdLeaseBake(b *testing.B) {
	testutil.NeedTools(b, "baking runs on a staging server: apt-get install openssh-server openssh-client rsync", "/usr/sbin/sshd", "rsync", "ssh")
	dir := b.TempDir()
	bake := filepath.Join(dir, "bake.sh")
	install := `mkdir -p "$HANGAR_ROOT/opt/tool" && sleep 3 && touch "$HANGAR_ROOT/opt/tool/installed"`
	if err := os.WriteFile(bake, []byte(install+"\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	worker := `[ -e "$HANGAR_ROOT/opt/tool/installed" ] || { ` + install + `; }; ` + workerCommand
	cfg := strings.Replace(testTOML(filepath.Join(dir, "data"), "demo", "max_instances = 1\n[pools.demo.bake]\nscript = "+strconv.Quote(bake)+"\n"),
		"worker_command = "+strconv.Quote(workerCommand), "worker_command = "+strconv.Quote(worker), 1)
	cfgPath := filepath.Join(dir, "hangar.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	ts := startTest(b, cfg, nil)
	ctx := context.Background()
	coldLease := func() time.Duration {
		start := time.Now()
		v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "120s"})
		if err != nil || v.State != pool.LeaseActive {
			b.Fatalf("lease: %+v, %v", v, err)
		}
		env := filepath.Join(ts.dataDir, "local", "instances", v.Instance.ID, "disk", "worker.env")
		for {
			if data, _ := os.ReadFile(env); strings.Contains(string(data), "HANGAR_LEASE_ID="+v.ID+"\n") {
				break
			}
			if time.Since(start) > 2*time.Minute {
				b.Fatalf("the worker of %s never started", v.ID)
			}
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(start)
		// Discarded, so that the next lease is cold again.
		if err := ts.client.Release(ctx, v.ID, true); err != nil {
			b.Fatal(err)
		}
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
			list, err := ts.client.Instances(ctx, "demo")
			if err == nil && len(list) == 0 {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("the discarded instance never went: %+v, %v", list, err)
			}
		}
		return took
	}
	var before, after time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		before += coldLease()
	}
	b.StopTimer()
	var out, errOut strings.Builder
	if code := run([]string{"--server=" + ts.url, "image", "bake", "demo", "--config", cfgPath}, &out, &errOut); code != 0 {
		b.Fatalf("bake: exit %d\n%s", code, errOut.String())
	}
	b.StartTimer()
	for i := 0; i < b.N; i++ {
		after += coldLease()
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(before.Seconds()/n, "before-s/op")
	b.ReportMetric(after.Seconds()/n, "after-s/op")
	b.ReportMetric(float64(after)/float64(before), "after/before")
}
