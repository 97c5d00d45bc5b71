package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// gitlabDir holds the GitLab custom executor's files, tested here as they
// are shipped.
var gitlabDir = filepath.Join("..", "..", "ci", "gitlab")

// What gitlab-runner hands its drivers for the outcome of run_exec. Not 1:
// a script that fails on its own must not pass for either.
const (
	gitlabBuildFailure  = 41
	gitlabSystemFailure = 42
)

// gitlabDriver is ci/gitlab installed as /etc/gitlab-runner/hangar would
// be: the scripts unchanged, hangar.env with this test's values.
type gitlabDriver struct {
	dir   string
	state string // HANGAR_STATE
	// The executables config.toml names.
	prepare, run, cleanup string
}

// installGitLab copies ci/gitlab's scripts into a directory of their own
// and writes hangar.env with env's values in place of the shipped ones:
// every variable that the shipped hangar.env sets must be in env.
func installGitLab(t *testing.T, env map[string]string) *gitlabDriver {
	t.Helper()
	var cfg struct {
		Runners []struct {
			Executor  string `toml:"executor"`
			BuildsDir string `toml:"builds_dir"`
			CacheDir  string `toml:"cache_dir"`
			Custom    struct {
				PrepareExec string `toml:"prepare_exec"`
				RunExec     string `toml:"run_exec"`
				CleanupExec string `toml:"cleanup_exec"`
			} `toml:"custom"`
		} `toml:"runners"`
	}
	if _, err := toml.DecodeFile(filepath.Join(gitlabDir, "config.toml"), &cfg); err != nil {
		t.Fatalf("ci/gitlab/config.toml: %v", err)
	}
	if len(cfg.Runners) != 1 || cfg.Runners[0].Executor != "custom" || cfg.Runners[0].BuildsDir == "" || cfg.Runners[0].CacheDir == "" {
		t.Fatalf("ci/gitlab/config.toml: want one custom runner with builds_dir and cache_dir, got %+v", cfg.Runners)
	}
	c := cfg.Runners[0].Custom
	d := &gitlabDriver{dir: t.TempDir(), state: env["HANGAR_STATE"]}
	for _, s := range []struct {
		exec string
		dst  *string
	}{{c.PrepareExec, &d.prepare}, {c.RunExec, &d.run}, {c.CleanupExec, &d.cleanup}} {
		if s.exec == "" {
			t.Fatalf("ci/gitlab/config.toml: prepare_exec, run_exec and cleanup_exec are all needed: %+v", c)
		}
		b, err := os.ReadFile(filepath.Join(gitlabDir, filepath.Base(s.exec)))
		if err != nil {
			t.Fatalf("config.toml names %s: %v", s.exec, err)
		}
		*s.dst = filepath.Join(d.dir, filepath.Base(s.exec))
		if err := os.WriteFile(*s.dst, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	shipped, err := os.ReadFile(filepath.Join(gitlabDir, "hangar.env"))
	if err != nil {
		t.Fatal(err)
	}
	assign := regexp.MustCompile(`^(export )?([A-Z_]+)=\S*(.*)$`)
	seen := map[string]bool{}
	var out strings.Builder
	for _, line := range strings.Split(strings.TrimRight(string(shipped), "\n"), "\n") {
		if m := assign.FindStringSubmatch(line); m != nil {
			v, ok := env[m[2]]
			if !ok {
				t.Fatalf("ci/gitlab/hangar.env sets %s, which this test does not know", m[2])
			}
			line = fmt.Sprintf("%s%s=%q%s", m[1], m[2], v, m[3])
			seen[m[2]] = true
		}
		out.WriteString(line + "\n")
	}
	for k := range env {
		if !seen[k] {
			t.Fatalf("ci/gitlab/hangar.env does not set %s", k)
		}
	}
	if err := os.WriteFile(filepath.Join(d.dir, "hangar.env"), []byte(out.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

// gitlabJob is one job as gitlab-runner drives the driver's executables.
type gitlabJob struct {
	d   *gitlabDriver
	id  string
	env []string
}

func (d *gitlabDriver) job(t *testing.T, id string) *gitlabJob {
	t.Helper()
	tmp := t.TempDir()
	env := append(os.Environ(),
		"CUSTOM_ENV_CI_JOB_ID="+id,
		"CUSTOM_ENV_CI_PROJECT_PATH=group/project",
		"CUSTOM_ENV_CI_COMMIT_SHA=0123456789abcdef0123456789abcdef01234567",
		"CUSTOM_ENV_CI_BUILDS_DIR=/builds",
		fmt.Sprintf("BUILD_FAILURE_EXIT_CODE=%d", gitlabBuildFailure),
		fmt.Sprintf("SYSTEM_FAILURE_EXIT_CODE=%d", gitlabSystemFailure),
		"BUILD_EXIT_CODE_FILE="+filepath.Join(tmp, "build-exit-code"),
		"TMPDIR="+tmp,
	)
	return &gitlabJob{d: d, id: id, env: env}
}

// command is an executable of the driver as gitlab-runner starts it: in a
// fresh directory, with the job's environment.
func (j *gitlabJob) command(t *testing.T, exe string, args ...string) *exec.Cmd {
	cmd := exec.Command(exe, args...)
	cmd.Dir = t.TempDir()
	cmd.Env = j.env
	return cmd
}

// exec runs an executable and returns its exit status and output.
func (j *gitlabJob) exec(t *testing.T, exe string, args ...string) (int, string) {
	t.Helper()
	out, err := j.command(t, exe, args...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("%s: %v", exe, err)
	return 0, ""
}

// stage writes a stage's script to a file, as gitlab-runner does, and
// runs run_exec on it.
func (j *gitlabJob) stage(t *testing.T, name, script string) (int, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "script.")
	if err := os.WriteFile(path, []byte("#!/usr/bin/env bash\nset -eo pipefail\n"+script+"\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	return j.exec(t, j.d.run, path, name)
}

func (j *gitlabJob) lease(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(j.d.state, "job-"+j.id))
	if err != nil {
		t.Fatalf("job %s has no lease: %v", j.id, err)
	}
	return strings.TrimSpace(string(b))
}

func (j *gitlabJob) buildExitCode(t *testing.T) string {
	t.Helper()
	for _, e := range j.env {
		if p, ok := strings.CutPrefix(e, "BUILD_EXIT_CODE_FILE="); ok {
			b, _ := os.ReadFile(p)
			return strings.TrimSpace(string(b))
		}
	}
	return ""
}

// gitlabTOML: pool gitlab for the jobs, and pool full, of one instance,
// that the test keeps leased.
func gitlabTOML(dataDir string) string {
	return fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[providers.local]
type = "local"

[pools.gitlab]
provider = "local"
max_instances = 2
idle_ttd = "5m"
boot_timeout = "2m"

[pools.full]
provider = "local"
max_instances = 1
idle_ttd = "5m"
boot_timeout = "2m"
worker_command = %q
`, dataDir, workerCommand)
}

// ci/gitlab's scripts, run the way gitlab-runner runs a custom executor's
// (prepare_exec; run_exec SCRIPT STAGE for each stage; cleanup_exec, with
// the CUSTOM_ENV_* and *_EXIT_CODE variables), against hangar serve with
// the hangar binary on PATH: the stages of a job share one instance and
// its files; a failed script is the build's failure and its status goes
// to BUILD_EXIT_CODE_FILE; Hangar's failures (no lease, the lease gone, no
// instance within HANGAR_WAIT, no server) are the system's; a cancel's
// SIGTERM ends the command and the lease; cleanup always gives the
// instance back.
func TestGitLabCustomExecutor(t *testing.T) {
	testutil.NeedTool(t, "jq", "the GitLab scripts read hangar lease -o json (Debian: jq)")
	if shellcheck, err := exec.LookPath("shellcheck"); err != nil {
		if testutil.RequireTools() {
			testutil.ToolMissing(t, "shellcheck is not on PATH: the GitLab scripts go unlinted (Debian: shellcheck)")
		}
		t.Log("shellcheck is not on PATH: the GitLab scripts go unlinted (Debian: shellcheck)")
	} else {
		scripts, _ := filepath.Glob(filepath.Join(gitlabDir, "*.sh"))
		args := append([]string{"--severity=warning", "-x", "-P", gitlabDir}, scripts...)
		if out, err := exec.Command(shellcheck, args...).CombinedOutput(); err != nil {
			t.Errorf("shellcheck: %v\n%s", err, out)
		}
	}
	ts := startTest(t, gitlabTOML(t.TempDir()), nil)
	bin := hangarBinary(t)
	t.Setenv("PATH", filepath.Dir(bin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	t.Setenv("HANGAR_SERVER", "")
	t.Setenv("HANGAR_TOKEN", "")
	values := func(server, pool, wait string) map[string]string {
		return map[string]string{"HANGAR_SERVER": server, "HANGAR_TOKEN": "", "HANGAR_POOL": pool,
			"HANGAR_WAIT": wait, "HANGAR_TTL": "2h", "HANGAR_STATE": filepath.Join(t.TempDir(), "state")}
	}
	d := installGitLab(t, values(ts.url, "gitlab", "10m"))
	ctx := context.Background()
	stages := []string{"prepare_script", "get_sources", "restore_cache", "download_artifacts", "step_script", "after_script", "archive_cache", "upload_artifacts_on_success", "cleanup_file_variables"}

	var instance string
	t.Run("job", func(t *testing.T) {
		j := d.job(t, "1001")
		code, out := j.exec(t, d.prepare)
		if code != 0 || !strings.Contains(out, "Running on i-") {
			t.Fatalf("prepare: exit %d: %s", code, out)
		}
		lease := j.lease(t)
		for i, st := range stages {
			script := fmt.Sprintf(`echo "%s $HANGAR_LEASE_ID" >> stages.log`, st)
			if st == "step_script" {
				script += "\necho \"building with $(wc -l < stages.log) stages before\"\n" + `printf '%s\n' "it's" '$(not run)' "a  b"`
			}
			code, out := j.stage(t, st, script)
			want := ""
			if st == "step_script" {
				want = fmt.Sprintf("building with %d stages before\nit's\n$(not run)\na  b\n", i+1)
			}
			if code != 0 || out != want {
				t.Errorf("%s: exit %d, output %q; want 0, %q", st, code, out, want)
			}
		}
		code, out = j.stage(t, "step_release", "cat stages.log")
		if code != 0 || strings.Count(out, " "+lease+"\n") != len(stages) {
			t.Errorf("the stages did not all run on lease %s: exit %d\n%s", lease, code, out)
		}
		v, err := ts.client.GetLease(ctx, lease, 0)
		if err != nil || v.State != pool.LeaseActive {
			t.Fatalf("lease %s between stages: %+v, %v", lease, v, err)
		}
		instance = v.Instance.ID
		if code, out := j.exec(t, d.cleanup); code != 0 {
			t.Errorf("cleanup: exit %d: %s", code, out)
		}
		if v, err := ts.client.GetLease(ctx, lease, 0); err != nil || v.State != pool.LeaseReleased {
			t.Errorf("lease after cleanup: %+v, %v; want released", v, err)
		}
		if _, err := os.Stat(filepath.Join(d.state, "job-1001")); !os.IsNotExist(err) {
			t.Errorf("cleanup left the job's state file (%v)", err)
		}
	})

	t.Run("build failure", func(t *testing.T) {
		j := d.job(t, "1002")
		if code, out := j.exec(t, d.prepare); code != 0 {
			t.Fatalf("prepare: exit %d: %s", code, out)
		}
		code, out := j.stage(t, "step_script", "echo failing; exit 7")
		if code != gitlabBuildFailure || out != "failing\n" || j.buildExitCode(t) != "7" {
			t.Errorf("failed script: exit %d, output %q, BUILD_EXIT_CODE_FILE %q; want %d, \"failing\\n\", 7", code, out, j.buildExitCode(t), gitlabBuildFailure)
		}
		if code, out := j.stage(t, "after_script", "echo after"); code != 0 || out != "after\n" {
			t.Errorf("after_script after a failure: exit %d, %q", code, out)
		}
		if code, out := j.exec(t, d.cleanup); code != 0 {
			t.Errorf("cleanup: exit %d: %s", code, out)
		}
		noLeases(t, ts)
	})
	if instance != "" {
		testutil.Eventually(t, instance+" to be idle again", 30*time.Second, func() bool {
			for _, in := range ts.instances(t, "gitlab") {
				if in.ID == instance {
					return in.State == pool.Idle
				}
			}
			return false
		})
	}

	t.Run("lease gone", func(t *testing.T) {
		j := d.job(t, "1003")
		if code, out := j.exec(t, d.prepare); code != 0 {
			t.Fatalf("prepare: exit %d: %s", code, out)
		}
		if err := ts.client.Release(ctx, j.lease(t), true); err != nil {
			t.Fatal(err)
		}
		code, out := j.stage(t, "step_script", "echo never")
		if code != gitlabSystemFailure || strings.Contains(out, "never") || !strings.Contains(out, "is released") {
			t.Errorf("stage on a released lease: exit %d, output %q; want %d", code, out, gitlabSystemFailure)
		}
		if code, out := j.exec(t, d.cleanup); code != 0 {
			t.Errorf("cleanup of a released lease: exit %d: %s", code, out)
		}
	})

	t.Run("no prepare", func(t *testing.T) {
		j := d.job(t, "1004")
		if code, out := j.stage(t, "step_script", "echo never"); code != gitlabSystemFailure || strings.Contains(out, "never") {
			t.Errorf("stage without a lease: exit %d, output %q; want %d", code, out, gitlabSystemFailure)
		}
		if code, out := j.exec(t, d.cleanup); code != 0 {
			t.Errorf("cleanup without a lease: exit %d: %s", code, out)
		}
	})

	t.Run("no instance", func(t *testing.T) {
		if v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "full", Wait: "60s"}); err != nil || v.State != pool.LeaseActive {
			t.Fatalf("lease of pool full: %+v, %v; want active", v, err)
		}
		full := installGitLab(t, values(ts.url, "full", "1s"))
		j := full.job(t, "1005")
		code, out := j.exec(t, full.prepare)
		if code != gitlabSystemFailure || !strings.Contains(out, "no instance of pool full within 1s") {
			t.Errorf("prepare: exit %d, output %q; want %d", code, out, gitlabSystemFailure)
		}
		leases, err := ts.client.Leases(ctx, "full", "")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range leases {
			if l.State == pool.LeasePending {
				t.Errorf("prepare left lease %s pending", l.ID)
			}
		}
		if code, out := j.exec(t, full.cleanup); code != 0 {
			t.Errorf("cleanup: exit %d: %s", code, out)
		}
	})

	t.Run("no server", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		gone := "http://" + ln.Addr().String()
		if err := ln.Close(); err != nil {
			t.Fatal(err)
		}
		j := installGitLab(t, values(gone, "gitlab", "10m")).job(t, "1006")
		if code, out := j.exec(t, j.d.prepare); code != gitlabSystemFailure {
			t.Errorf("prepare: exit %d, output %q; want %d", code, out, gitlabSystemFailure)
		}
	})

	t.Run("cancel", func(t *testing.T) {
		j := d.job(t, "1007")
		if code, out := j.exec(t, d.prepare); code != 0 {
			t.Fatalf("prepare: exit %d: %s", code, out)
		}
		lease := j.lease(t)
		pidFile := filepath.Join(t.TempDir(), "remote.pid")
		path := filepath.Join(t.TempDir(), "script.")
		if err := os.WriteFile(path, []byte("echo $$ > "+pidFile+"; echo started; exec sleep 600\n"), 0o700); err != nil {
			t.Fatal(err)
		}
		cmd := j.command(t, d.run, path, "step_script")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = cmd.Process.Kill() }() // gone already, unless the test failed
		r := bufio.NewReader(stdout)
		if line, err := r.ReadString('\n'); err != nil || line != "started\n" {
			t.Fatalf("first output %q, %v", line, err)
		}
		v, err := ts.client.GetLease(ctx, lease, 0)
		if err != nil {
			t.Fatal(err)
		}
		remote := readFile(t, pidFile)
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil { // gitlab-runner's cancel
			t.Fatal(err)
		}
		rest, _ := io.ReadAll(r)
		err = cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != gitlabBuildFailure {
			t.Errorf("cancelled run_exec: %v, want exit %d; output %q", err, gitlabBuildFailure, rest)
		}
		if v, err := ts.client.GetLease(ctx, lease, 0); err != nil || v.State != pool.LeaseReleased {
			t.Errorf("lease after the cancel: %+v, %v; want released", v, err)
		}
		waitGone(t, ts, v.Instance.ID) //nolint:contextcheck // it lists with the test's own context, t.Context()
		var pid int
		if _, err := fmt.Sscan(remote, &pid); err != nil {
			t.Fatalf("the remote pid file: %q: %v", remote, err)
		}
		if pid == 0 || syscall.Kill(pid, 0) == nil {
			t.Errorf("the cancelled command (pid %q) outlived the cancel", remote)
		}
		if code, out := j.exec(t, d.cleanup); code != 0 {
			t.Errorf("cleanup after the cancel: exit %d: %s", code, out)
		}
	})
	if leases, err := ts.client.Leases(ctx, "gitlab", pool.LeaseActive); err != nil || len(leases) != 0 {
		t.Errorf("active leases of pool gitlab after every job's cleanup: %+v, %v", leases, err)
	}
}
