package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// hangarBinary builds the hangar command once per test run.
func hangarBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hangar-bin-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "hangar")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		if err := os.RemoveAll(filepath.Dir(binPath)); err != nil {
			fmt.Fprintln(os.Stderr, "removing the test binary:", err)
		}
	}
	os.Exit(code)
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().String()
}

// serveProcess runs `hangar serve` as a child process and waits until it
// answers. The caller ends it.
func serveProcess(t *testing.T, configPath, addr, logPath string) *exec.Cmd {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = logf.Close() }() // the child writes its own copy
	cmd := exec.Command(hangarBinary(t), "serve", "--config", configPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "hangar serve to answer", 30*time.Second, func() bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			_ = resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
	return cmd
}

// Leases acknowledged to clients survive kill -9 of the server: after a
// restart they are active on the same instances, whose bootstraps reconnect,
// and nothing was launched twice.
func TestKill9Restart(t *testing.T) {
	dir := t.TempDir()
	addr := freePort(t)
	dataDir := filepath.Join(dir, "data")
	cfg := testTOML(dataDir, "demo", "max_instances = 4")
	cfg = replaceOnce(cfg, `listen = "127.0.0.1:0"`, `listen = "`+addr+`"`)
	configPath := filepath.Join(dir, "hangar.toml")
	if err := os.WriteFile(configPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "serve.log")
	t.Cleanup(func() {
		terminateAll(t, filepath.Join(dataDir, "local"))
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server log:\n%s", b)
		}
	})

	proc := serveProcess(t, configPath, addr, logPath)
	c := &api.Client{BaseURL: "http://" + addr}
	ctx := context.Background()
	var leases []pool.LeaseView
	for i := 0; i < 3; i++ {
		v, err := c.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
		if err != nil || v.State != pool.LeaseActive {
			_ = proc.Process.Kill()
			t.Fatalf("lease %d: %+v, %v", i, v, err)
		}
		leases = append(leases, v)
	}
	// Acknowledged, so on disk: kill at once, with no chance to flush.
	if err := proc.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = proc.Wait() // killed: "signal: killed"
	for _, l := range leases {
		if len(instanceProcs(l.Instance.ID)) == 0 {
			t.Errorf("instance %s died with the server; the cloud should keep it", l.Instance.ID)
		}
	}

	proc = serveProcess(t, configPath, addr, logPath)
	defer func() {
		if err := proc.Process.Signal(syscall.SIGTERM); err != nil {
			t.Error(err)
		}
		if err := proc.Wait(); err != nil {
			t.Errorf("hangar serve after SIGTERM: %v", err)
		}
	}()
	for _, l := range leases {
		got, err := c.GetLease(ctx, l.ID, 0)
		if err != nil {
			t.Fatalf("lease %s after restart: %v", l.ID, err)
		}
		if got.State != pool.LeaseActive || got.Instance == nil || got.Instance.ID != l.Instance.ID || got.Worker.Password != l.Worker.Password {
			t.Errorf("lease after restart = %+v, want active on %s with the same password", got, l.Instance.ID)
		}
	}
	insts, err := c.Instances(ctx, "demo")
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != 3 {
		t.Errorf("%d instances after restart, want the same 3: %+v", len(insts), insts)
	}
	// The instances' bootstraps talk to the new server: a release comes
	// back as an idle instance only once the worker has stopped.
	if err := c.Release(ctx, leases[0].ID, false); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the released instance to be idle under the new server", 60*time.Second, func() bool {
		list, _ := c.Instances(ctx, "demo")
		for _, in := range list {
			if in.ID == leases[0].Instance.ID {
				return in.State == pool.Idle
			}
		}
		return false
	})
	again, err := c.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
	if err != nil || again.Instance == nil || again.Instance.ID != leases[0].Instance.ID {
		t.Errorf("lease after restart = %+v, %v; want the idle %s", again, err, leases[0].Instance.ID)
	}
}

func replaceOnce(s, old, new string) string {
	if !strings.Contains(s, old) {
		panic("replaceOnce: " + old + " not found")
	}
	return strings.Replace(s, old, new, 1)
}
