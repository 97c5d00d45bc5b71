package local

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/cloudtest"
)

func TestConformance(t *testing.T) {
	cloudtest.Run(t, func(t *testing.T) cloud.Provider {
		return newTestProvider(t, Options{})
	}, cloudtest.Options{})
}

func TestInstanceUsesMetadataService(t *testing.T) {
	p := newTestProvider(t, Options{})
	in := launchOne(t, p, `#!/bin/bash
set -u
md=$HANGAR_METADATA_URL/latest
token=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$md/api/token")
get() { curl -sf -H "X-aws-ec2-metadata-token: $token" "$md/$1"; }
echo "id=$(get meta-data/instance-id)"
echo "ip=$(get meta-data/local-ipv4)"
echo "zone=$(get meta-data/placement/availability-zone)"
echo "no-token=$(curl -s -o /dev/null -w '%{http_code}' "$md/meta-data/instance-id")"
echo "pwd=$PWD home=$HOME"
echo done
`)
	out := waitConsole(t, p, in.ID, "done\n")
	disk := filepath.Join(p.store.instanceDir(in.ID), "disk")
	for _, want := range []string{
		"id=" + in.ID + "\n",
		"ip=" + in.PrivateIP + "\n",
		"zone=local-1a\n",
		"no-token=401\n",
		"pwd=" + disk + " home=" + disk + "\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("console lacks %q:\n%s", want, out)
		}
	}
}

func TestInstanceIDsAndIPs(t *testing.T) {
	p := newTestProvider(t, Options{})
	const workers, perLaunch = 12, 2
	var mu sync.Mutex
	var all []cloud.Instance
	var wg sync.WaitGroup
	errs := make(chan error, workers+2)
	sameToken := launchSpec("", nil)
	var sameTokenIDs [][]string
	for i := range workers + 2 {
		wg.Go(func() {
			spec := launchSpec("", map[string]string{"worker": strconv.Itoa(i)})
			if i >= workers {
				spec = sameToken
			}
			insts, err := p.Launch(t.Context(), spec, perLaunch)
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if i >= workers {
				sameTokenIDs = append(sameTokenIDs, []string{insts[0].ID, insts[1].ID})
				if len(sameTokenIDs) == 1 {
					all = append(all, insts...)
				}
				return
			}
			all = append(all, insts...)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Launch: %v", err)
	}
	if !slices.Equal(sameTokenIDs[0], sameTokenIDs[1]) {
		t.Errorf("concurrent Launches with one token got %v and %v", sameTokenIDs[0], sameTokenIDs[1])
	}
	ids, ips := map[string]bool{}, map[string]bool{}
	for _, in := range all {
		if !validID(in.ID) {
			t.Errorf("id %q is not i- and 17 hex digits", in.ID)
		}
		ip := net.ParseIP(in.PrivateIP)
		if ip == nil || !ip.IsLoopback() || in.PrivateIP == "127.0.0.1" {
			t.Errorf("%s has private IP %q, want a loopback address other than 127.0.0.1", in.ID, in.PrivateIP)
		}
		if ids[in.ID] || ips[in.PrivateIP] {
			t.Errorf("duplicate id %s or IP %s", in.ID, in.PrivateIP)
		}
		ids[in.ID], ips[in.PrivateIP] = true, true
	}
	want := (workers + 1) * perLaunch
	if len(ids) != want {
		t.Errorf("got %d unique ids, want %d", len(ids), want)
	}
	listed, err := p.List(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(listed) != want {
		t.Errorf("List returned %d instances, want %d", len(listed), want)
	}
}

func TestStateSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	p1, err := New(t.Context(), Options{Dir: dir, BootDelay: time.Second, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { terminateAll(t, p1) })
	tags := map[string]string{cloud.TagPool: "demo", cloud.TagIntent: "x1"}
	launched, err := p1.Launch(t.Context(), launchSpec("#!/bin/bash\necho booted-after-restart\n", tags), 2)
	if err != nil {
		t.Fatal(err)
	}
	before, err := p1.List(t.Context(), tags)
	if err != nil {
		t.Fatal(err)
	}
	url := p1.MetadataURL()
	if err := p1.Close(); err != nil {
		t.Fatal(err)
	}

	// The restart falls inside the boot delay: the boot must still happen.
	p2 := newTestProvider(t, Options{Dir: dir, BootDelay: time.Second})
	if p2.MetadataURL() != url {
		t.Errorf("metadata service moved from %s to %s although its port was free", url, p2.MetadataURL())
	}
	after, err := p2.List(t.Context(), tags)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != 2 || len(before) != 2 {
		t.Fatalf("listed %d instances before restart, %d after, want 2", len(before), len(after))
	}
	for i := range after {
		a, b := after[i], before[i]
		if a.ID != b.ID || a.PrivateIP != b.PrivateIP || !maps.Equal(a.Tags, tags) ||
			a.Type != b.Type || a.Zone != b.Zone || !a.LaunchedAt.Equal(b.LaunchedAt) {
			t.Errorf("after restart %+v, before %+v", a, b)
		}
		if a.State != cloud.StatePending && a.State != cloud.StateRunning {
			t.Errorf("%s is %s after restart", a.ID, a.State)
		}
	}
	for _, in := range launched {
		waitState(t, p2, in.ID, cloud.StateRunning)
		waitConsole(t, p2, in.ID, "booted-after-restart")
	}

	// A second live provider on the same dir shares the first's metadata
	// service (TestMetadataServiceShared) and lists every instance.
	p3 := newTestProvider(t, Options{Dir: dir})
	if p3.MetadataURL() != p2.MetadataURL() {
		t.Errorf("second provider's metadata URL = %s, want the first's, %s", p3.MetadataURL(), p2.MetadataURL())
	}
	if got, _ := p3.List(t.Context(), tags); len(got) != 2 {
		t.Errorf("a second provider lists %d instances, want 2", len(got))
	}
}

func TestStopStartTerminate(t *testing.T) {
	p := newTestProvider(t, Options{})
	in := launchOne(t, p, `#!/bin/bash
echo boot >> "$HOME/boots"
echo "boot-$(wc -l < "$HOME/boots")"
exec sleep 1000
`)
	waitConsole(t, p, in.ID, "boot-1\n")
	disk := filepath.Join(p.store.instanceDir(in.ID), "disk")

	for range 2 { // stopping a stopped instance is fine too
		if done, err := p.Stop(t.Context(), []string{in.ID}); err != nil || len(done) != 1 {
			t.Fatalf("Stop = %v, %v", done, err)
		}
	}
	stopped := get(t, p, in.ID)
	if stopped.State != cloud.StateStopped || stopped.PrivateIP != in.PrivateIP {
		t.Errorf("after Stop: %+v", stopped)
	}
	if pids := markedProcs(t, in.ID); len(pids) > 0 {
		t.Errorf("processes %v survived Stop", pids)
	}
	if _, err := os.Stat(filepath.Join(disk, "boots")); err != nil {
		t.Errorf("Stop lost the disk: %v", err)
	}

	if done, err := p.Start(t.Context(), []string{in.ID}); err != nil || len(done) != 1 {
		t.Fatalf("Start = %v, %v", done, err)
	}
	waitState(t, p, in.ID, cloud.StateRunning)
	waitConsole(t, p, in.ID, "boot-2\n")
	if done, err := p.Start(t.Context(), []string{in.ID}); err != nil || len(done) != 1 {
		t.Errorf("Start of a running instance = %v, %v; want success", done, err)
	}

	if _, err := p.Terminate(t.Context(), []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p.store.instanceDir(in.ID)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("instance directory still there after Terminate: %v", err)
	}
	gone := get(t, p, in.ID)
	if gone.State != cloud.StateTerminated || gone.PrivateIP != "" {
		t.Errorf("after Terminate: %+v", gone)
	}
	if _, err := p.Start(t.Context(), []string{in.ID}); err == nil || errors.Is(err, cloud.ErrNotFound) {
		t.Errorf("Start of a terminated instance: %v, want an error other than not found", err)
	}
	if out, err := p.ConsoleOutput(t.Context(), in.ID); err != nil || len(out) != 0 {
		t.Errorf("ConsoleOutput of a terminated instance = %q, %v", out, err)
	}
}

func TestRelaunchAfterTerminateReturnsTombstone(t *testing.T) {
	p := newTestProvider(t, Options{})
	spec := launchSpec("", nil)
	first, err := p.Launch(t.Context(), spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Terminate(t.Context(), []string{first[0].ID}); err != nil {
		t.Fatal(err)
	}
	again, err := p.Launch(t.Context(), spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(again) != 1 || again[0].ID != first[0].ID || again[0].State != cloud.StateTerminated {
		t.Errorf("relaunch with the token of a terminated instance = %+v, want it back terminated", again)
	}
}

func TestTerminateEndsEscapedProcesses(t *testing.T) {
	p := newTestProvider(t, Options{})
	// One child leaves the session by setsid after a double fork and ignores
	// SIGTERM; another stays in the group.
	in := launchOne(t, p, `#!/bin/bash
(setsid bash -c 'trap "" TERM; echo escaped; while :; do sleep 1; done' </dev/null &)
sleep 1000 &
echo started
wait
`)
	waitConsole(t, p, in.ID, "escaped")
	waitConsole(t, p, in.ID, "started")
	r, err := p.store.getRecord(in.ID)
	if err != nil {
		t.Fatal(err)
	}
	escaped := scanProcs(t, func(pid int, st procStat, env []string) bool {
		return slices.Contains(env, envMarker+"="+in.ID) && st.pgrp != r.PGID
	})
	if len(escaped) == 0 {
		t.Fatal("test is broken: no process left the instance's process group")
	}

	if _, err := p.Terminate(t.Context(), []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	if pids := markedProcs(t, in.ID); len(pids) > 0 {
		t.Errorf("processes %v with the instance's marker survived Terminate", pids)
	}
	inGroup := scanProcs(t, func(pid int, st procStat, env []string) bool { return st.pgrp == r.PGID })
	if len(inGroup) > 0 {
		t.Errorf("processes %v of the instance's group survived Terminate", inGroup)
	}
}

func TestUserDataForms(t *testing.T) {
	p := newTestProvider(t, Options{})
	mime := strings.ReplaceAll(`Content-Type: multipart/mixed; boundary="XX"
MIME-Version: 1.0

--XX
Content-Type: text/cloud-config; charset="us-ascii"

#cloud-config
runcmd: [echo from-cloud-config]

--XX
Content-Type: text/x-shellscript; charset="utf-8"
Content-Transfer-Encoding: base64

IyEvYmluL2Jhc2gKZWNobyBwYXJ0LW9uZQo=

--XX
Content-Type: text/x-shellscript

#!/bin/bash
x=part-two
echo "$x"
--XX--
`, "\n", "\r\n")
	in := launchOne(t, p, mime)
	out := waitConsole(t, p, in.ID, "part-two")
	skip := strings.Index(out, "skipping user-data part 1 (text/cloud-config)")
	one, two := strings.Index(out, "part-one\n"), strings.Index(out, "part-two\n")
	if skip < 0 || one < skip || two < one {
		t.Errorf("console does not show the skipped cloud-config part, then part one, then two:\n%s", out)
	}
	if strings.Contains(out, "from-cloud-config") {
		t.Errorf("cloud-config part ran:\n%s", out)
	}

	_, err := p.Launch(t.Context(), launchSpec("#cloud-config\nruncmd: [true]\n", nil), 1)
	if err == nil || !strings.Contains(err.Error(), "shell-script or MIME user-data only") {
		t.Errorf("Launch of #cloud-config: %v, want a refusal", err)
	}
	if insts, _ := p.List(t.Context(), nil); len(insts) != 1 {
		t.Errorf("refused launch left instances: %+v", insts)
	}

	empty := launchOne(t, p, "")
	waitState(t, p, empty.ID, cloud.StateRunning)
}

func TestBootSteps(t *testing.T) {
	tests := []struct {
		name, userData string
		want           []bootStep
		wantErr        bool
	}{
		{"empty", "", nil, false},
		{"blank", " \n", nil, false},
		{"script", "#!/bin/sh\ntrue\n", []bootStep{{true, []byte("#!/bin/sh\ntrue\n")}}, false},
		{"cloud-config", "#cloud-config\n", nil, true},
		{"include", "#include\nhttps://example.invalid/x\n", nil, true},
		{"mime without boundary", "Content-Type: multipart/mixed\n\n", nil, true},
		{"mime not multipart", "Content-Type: text/x-shellscript\n\necho hi\n", nil, true},
		{"mime", "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n--b\n\n#!/bin/bash\n--b--\n",
			[]bootStep{
				{false, []byte("hangar-local: skipping user-data part 1 (text/plain): the local provider runs only text/x-shellscript parts\n")},
				{false, []byte("hangar-local: skipping user-data part 2 (text/plain): the local provider runs only text/x-shellscript parts\n")},
			}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := bootSteps([]byte(tc.userData))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err != nil && !errors.Is(err, errUnsupportedUserData) && !strings.Contains(err.Error(), "MIME") {
				t.Errorf("error %q does not say what the local provider runs", err)
			}
			if !slices.EqualFunc(got, tc.want, func(a, b bootStep) bool {
				return a.script == b.script && string(a.body) == string(b.body)
			}) {
				t.Errorf("steps = %s, want %s", showSteps(got), showSteps(tc.want))
			}
		})
	}
}

func TestBootDelay(t *testing.T) {
	const delay = 300 * time.Millisecond
	p := newTestProvider(t, Options{BootDelay: delay})
	in := launchOne(t, p, "#!/bin/bash\necho \"started-at=$(date +%s%N)\"\n")
	if in.State != cloud.StatePending {
		t.Errorf("Launch returned %s, want pending during the boot delay", in.State)
	}
	// States only move forward: pending until running, then running.
	seen := []cloud.State{in.State}
	for seen[len(seen)-1] != cloud.StateRunning {
		s := get(t, p, in.ID).State
		if s != seen[len(seen)-1] {
			seen = append(seen, s)
		}
		if len(seen) > 2 || s != cloud.StatePending && s != cloud.StateRunning {
			t.Fatalf("states seen %v, want pending then running", seen)
		}
		time.Sleep(10 * time.Millisecond)
	}
	out := waitConsole(t, p, in.ID, "started-at=")
	_, ns, _ := strings.Cut(out, "started-at=")
	started, err := strconv.ParseInt(strings.TrimSpace(ns), 10, 64)
	if err != nil {
		t.Fatalf("parsing start time from %q: %v", out, err)
	}
	if bootAt := in.LaunchedAt.Add(delay); time.Unix(0, started).Before(bootAt) {
		t.Errorf("user-data started at %s, before the boot delay ended at %s", time.Unix(0, started), bootAt)
	}
}

func TestServerEnvironmentDoesNotLeak(t *testing.T) {
	t.Setenv("HANGAR_TEST_SECRET", "hunter2-do-not-leak")
	p := newTestProvider(t, Options{})
	in := launchOne(t, p, "#!/bin/bash\nenv\necho env-done\n")
	out := waitConsole(t, p, in.ID, "env-done")
	if strings.Contains(out, "hunter2") || strings.Contains(out, "HANGAR_TEST_SECRET") {
		t.Errorf("the server's environment reached the instance:\n%s", out)
	}
	// bash itself adds PWD, SHLVL and _.
	allowed := []string{"PATH", "HOME", "LANG", "TMPDIR", "HANGAR_USERDATA_CLOUD_DIR", "HANGAR_METADATA_URL", envMarker, rootEnv, "PWD", "SHLVL", "_", "OLDPWD"}
	for line := range strings.SplitSeq(out, "\n") {
		name, _, ok := strings.Cut(line, "=")
		if ok && !strings.Contains(name, " ") && !slices.Contains(allowed, name) {
			t.Errorf("unexpected variable %s in the instance's environment", name)
		}
	}
	if !strings.Contains(out, "LANG=C.UTF-8\n") || !strings.Contains(out, envMarker+"="+in.ID+"\n") {
		t.Errorf("instance environment lacks LANG or its marker:\n%s", out)
	}
}

func TestConsoleOutputTail(t *testing.T) {
	p := newTestProvider(t, Options{})
	in := launchOne(t, p, "#!/bin/bash\nhead -c 100000 /dev/zero | tr '\\0' x\necho\necho tail-end\n")
	waitConsole(t, p, in.ID, "tail-end")
	out, err := p.ConsoleOutput(t.Context(), in.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != consoleTail || !strings.HasSuffix(string(out), "x\ntail-end\n") {
		t.Errorf("ConsoleOutput returned %d bytes ending %q, want the last %d", len(out), out[max(0, len(out)-20):], consoleTail)
	}
}

func TestNewRefusesNonLoopback(t *testing.T) {
	_, err := New(t.Context(), Options{Dir: t.TempDir(), MetadataAddr: "0.0.0.0:0"})
	if err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("New with a non-loopback metadata address: %v, want a refusal", err)
	}
}

func showSteps(steps []bootStep) string {
	var b strings.Builder
	for _, s := range steps {
		fmt.Fprintf(&b, "{script=%v %q} ", s.script, s.body)
	}
	return b.String()
}

func TestTombstonesExpire(t *testing.T) {
	var offset atomic.Int64
	p := newTestProviderClock(t, Options{}, func() time.Time { return time.Now().Add(time.Duration(offset.Load())) })
	spec := launchSpec("", nil)
	first, err := p.Launch(t.Context(), spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	id := first[0].ID
	if _, err := p.Terminate(t.Context(), []string{id}); err != nil {
		t.Fatal(err)
	}
	offset.Store(int64(2 * time.Hour))
	if insts, _ := p.List(t.Context(), nil); len(insts) != 0 {
		t.Errorf("List two hours after Terminate = %+v, want nothing", insts)
	}
	if again, err := p.Launch(t.Context(), spec, 1); err != nil || len(again) != 1 || again[0].ID != id {
		t.Errorf("relaunch within a day = %+v, %v; want the old instance back", again, err)
	}

	// Files carry real modification times: age them instead of the clock.
	old := time.Now().Add(-25 * time.Hour)
	for _, f := range []string{p.store.tombstonePath(id), p.store.tokenPath(spec.ClientToken)} {
		if err := os.Chtimes(f, old, old); err != nil {
			t.Fatal(err)
		}
	}
	offset.Store(int64(3 * time.Hour)) // past gcEvery since the last clean-up
	again, err := p.Launch(t.Context(), spec, 1)
	if err != nil || len(again) != 1 || again[0].ID == id {
		t.Errorf("relaunch after a day = %+v, %v; want a new instance", again, err)
	}
	if _, err := os.Stat(p.store.tombstonePath(id)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("day-old tombstone not removed: %v", err)
	}
}

func TestHaltFinishesInterruptedCalls(t *testing.T) {
	p := newTestProvider(t, Options{})
	in := launchOne(t, p, "#!/bin/bash\nexec sleep 1000\n")
	waitState(t, p, in.ID, cloud.StateRunning)
	// As if a server died in the middle of Stop, then of Terminate.
	setState := func(s cloud.State) {
		r, err := p.store.getRecord(in.ID)
		if err != nil {
			t.Fatal(err)
		}
		r.State = s
		if err := p.store.putRecord(r); err != nil {
			t.Fatal(err)
		}
	}
	setState(cloud.StateStopping)
	if get(t, p, in.ID).State != cloud.StateStopping {
		t.Fatal("List does not report stopping")
	}
	if _, err := p.Start(t.Context(), []string{in.ID}); err == nil {
		t.Error("Start of a stopping instance succeeded")
	}
	if done, err := p.Stop(t.Context(), []string{in.ID}); err != nil || len(done) != 1 {
		t.Fatalf("Stop of a stopping instance = %v, %v", done, err)
	}
	if s := get(t, p, in.ID).State; s != cloud.StateStopped {
		t.Fatalf("after Stop: %s", s)
	}
	if pids := markedProcs(t, in.ID); len(pids) > 0 {
		t.Errorf("processes %v survived", pids)
	}
	setState(cloud.StateTerminating)
	if _, err := p.Stop(t.Context(), []string{in.ID}); err == nil {
		t.Error("Stop of a terminating instance succeeded")
	}
	if done, err := p.Terminate(t.Context(), []string{in.ID}); err != nil || len(done) != 1 {
		t.Fatalf("Terminate of a terminating instance = %v, %v", done, err)
	}
	if s := get(t, p, in.ID).State; s != cloud.StateTerminated {
		t.Errorf("after Terminate: %s", s)
	}
}
