package staging_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/cloud/staging/sshtest"
)

// benchTree is a mix of file sizes adding up to 1 GiB: one large file,
// some medium ones, and many small ones whose count stresses rsync's file
// list rather than its bandwidth.
var benchTree = []struct {
	count int
	size  int
}{
	{1, 256 << 20},
	{28, 16 << 20},
	{512, 512 << 10},
	{8192, 8 << 10},
}

// BenchmarkPut1GiB compares, in one run, (a) plain rsync over ssh, (b)
// Rsync into a fresh directory, and (c) Rsync again after a few small
// changes (a delta transfer). It reports each time and the ratios b/a and
// c/b. It needs about 3 GiB of free disk.
//
//	go test -run '^$' -bench Put1GiB -benchtime 1x ./cloud/staging/
func BenchmarkPut1GiB(b *testing.B) {
	needRsync(b)
	dir := b.TempDir()
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		b.Fatal(err)
	}
	if free := int64(fs.Bavail) * int64(fs.Bsize); free < 4<<30 {
		b.Skipf("%s has %d MiB free; the benchmark needs 4 GiB", dir, free>>20)
	}
	env := benchEnv(b)
	src := filepath.Join(dir, "src")
	total := writeBenchTree(b, src)
	b.Logf("source: %d MiB in %s", total>>20, src)

	plainSSH := fmt.Sprintf("ssh -i %s -o UserKnownHostsFile=%s -p %d", env.keyPath, env.kh.Path, env.srv.Port())
	ep := &staging.Endpoint{User: env.srv.User(), Host: "127.0.0.1", Port: env.srv.Port()}
	opts := staging.RsyncOptions{KeyPath: env.keyPath, KnownHostsPath: env.kh.Path}
	ctx := context.Background()

	var plain, engine, delta time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		plainDest := filepath.Join(dir, "plain-"+strconv.Itoa(i))
		engineDest := filepath.Join(dir, "engine-"+strconv.Itoa(i))

		start := time.Now()
		cmd := exec.Command("rsync", "-a", "-e", plainSSH, src+"/", env.srv.User()+"@127.0.0.1:"+plainDest)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("plain rsync: %v\n%s", err, out)
		}
		plain += time.Since(start)

		start = time.Now()
		if err := staging.Rsync(ctx, opts, []staging.Path{{Path: src + "/"}}, staging.Path{Host: ep, Path: engineDest}); err != nil {
			b.Fatal(err)
		}
		engine += time.Since(start)

		b.StopTimer()
		changeBenchTree(b, src, i)
		b.StartTimer()
		start = time.Now()
		if err := staging.Rsync(ctx, opts, []staging.Path{{Path: src + "/"}}, staging.Path{Host: ep, Path: engineDest}); err != nil {
			b.Fatal(err)
		}
		delta += time.Since(start)

		b.StopTimer()
		for _, d := range []string{plainDest, engineDest} {
			if err := os.RemoveAll(d); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(plain.Seconds()/n, "plain-s")
	b.ReportMetric(engine.Seconds()/n, "engine-s")
	b.ReportMetric(delta.Seconds()/n, "delta-s")
	b.ReportMetric(engine.Seconds()/plain.Seconds(), "engine/plain")
	b.ReportMetric(delta.Seconds()/engine.Seconds(), "delta/engine")
	b.ReportMetric(float64(total)/(1<<20)/(engine.Seconds()/n), "engine-MiB/s")
}

// benchEnv is newTestEnv for a benchmark.
func benchEnv(b *testing.B) *testEnv {
	srv := sshtest.Start(b)
	signer, pub, keyPath, err := staging.LoadOrCreateKey(filepath.Join(b.TempDir(), "keys"), "bench")
	if err != nil {
		b.Fatal(err)
	}
	srv.AuthorizeKey(pub)
	kh := &staging.KnownHosts{Path: filepath.Join(b.TempDir(), "known_hosts")}
	if err := kh.Pin(srv.Addr(), srv.HostKey()); err != nil {
		b.Fatal(err)
	}
	return &testEnv{srv: srv, signer: signer, keyPath: keyPath, kh: kh}
}

// writeBenchTree writes benchTree's files of pseudo-random (incompressible)
// bytes under root and returns their total size.
func writeBenchTree(b *testing.B, root string) int64 {
	rng := rand.NewChaCha8([32]byte{1})
	buf := make([]byte, 1<<20)
	var total int64
	for _, group := range benchTree {
		sub := filepath.Join(root, strconv.Itoa(group.size))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			b.Fatal(err)
		}
		for i := range group.count {
			f, err := os.Create(filepath.Join(sub, strconv.Itoa(i)))
			if err != nil {
				b.Fatal(err)
			}
			for left := group.size; left > 0; left -= len(buf) {
				chunk := buf[:min(left, len(buf))]
				_, _ = rng.Read(chunk)
				if _, err := f.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			if err := f.Close(); err != nil {
				b.Fatal(err)
			}
			total += int64(group.size)
		}
	}
	return total
}

// changeBenchTree rewrites a few small files and 1 MiB in the middle of
// the large one, as a rebuilt cache would change.
func changeBenchTree(b *testing.B, root string, round int) {
	stamp := []byte(fmt.Sprintf("round %d at %d\n", round, time.Now().UnixNano()))
	for i := range 5 {
		p := filepath.Join(root, strconv.Itoa(8<<10), strconv.Itoa(i*1000))
		if err := os.WriteFile(p, stamp, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	f, err := os.OpenFile(filepath.Join(root, strconv.Itoa(256<<20), "0"), os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	patch := make([]byte, 1<<20)
	_, _ = rand.NewChaCha8([32]byte{byte(round + 2)}).Read(patch)
	if _, err := f.WriteAt(patch, 100<<20); err != nil {
		b.Fatal(err)
	}
}
