package local

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// stubbornUserData leaves processes that only SIGKILL ends, of every kind
// Terminate looks for: one that left the session (found by its marker), one
// in the group without the marker (found by the group), and a plain sleep in
// the group that SIGTERM ends, whose pid it writes to $HOME/sleep.pid.
const stubbornUserData = `#!/bin/bash
(setsid bash -c 'trap "" TERM; echo escaped; while :; do sleep 1; done' </dev/null &)
env -u ` + envMarker + ` bash -c 'trap "" TERM; echo unmarked; while :; do sleep 1; done' &
sleep 1000 &
echo $! > "$HOME/sleep.pid"
echo started
wait
`

// stubbornProc is a process of an instance, told from a later one with its
// pid by its start time.
type stubbornProc struct {
	pid   int
	start uint64
	what  string
	// ignoresTerm: one of the two shells that only SIGKILL ends.
	ignoresTerm bool
}

func (sp stubbornProc) alive() bool {
	st, err := readStat(sp.pid)
	return err == nil && st.state != 'Z' && st.state != 'X' && st.start == sp.start
}

// launchStubborn launches stubbornUserData on p and returns the instance,
// its record and every process it has once all have started.
func launchStubborn(t *testing.T, p *Provider) (cloud.Instance, *record, []stubbornProc) {
	t.Helper()
	in := launchOne(t, p, stubbornUserData)
	for _, s := range []string{"escaped", "unmarked", "started"} {
		waitConsole(t, p, in.ID, s)
	}
	r, err := p.store.getRecord(in.ID)
	if err != nil {
		t.Fatal(err)
	}
	if r.PGID <= 0 {
		t.Fatalf("record of %s has no process group: %+v", in.ID, r)
	}
	var procs []stubbornProc
	kinds := map[string]bool{}
	scanProcs(t, func(pid int, st procStat, env []string) bool {
		marked := slices.Contains(env, envMarker+"="+in.ID)
		if !marked && st.pgrp != r.PGID {
			return false
		}
		sp := stubbornProc{pid: pid, start: st.start, what: "in the group"}
		switch {
		case !marked:
			sp.what = "in the group without the marker"
		case st.pgrp != r.PGID:
			sp.what = "out of the group with the marker"
		}
		cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if bytes.Contains(cmdline, []byte(`trap "" TERM`)) {
			sp.ignoresTerm = true
			kinds[sp.what] = true
		}
		procs = append(procs, sp)
		return true
	})
	if !kinds["in the group without the marker"] || !kinds["out of the group with the marker"] {
		t.Fatalf("test is broken: want a process that ignores SIGTERM out of the group and one without the marker, have %+v", procs)
	}
	return in, r, procs
}

// checkStuck checks how an instance left terminating by a crashed Terminate
// looks: listed as terminating with its launch time, processes alive. That
// is what the pool sees until it terminates the instance again.
func checkStuck(t *testing.T, p *Provider, in cloud.Instance, procs []stubbornProc) {
	t.Helper()
	got := get(t, p, in.ID)
	if got.State != cloud.StateTerminating {
		t.Errorf("List reports an instance whose Terminate crashed as %s, want %s", got.State, cloud.StateTerminating)
	}
	if !got.LaunchedAt.Equal(in.LaunchedAt) {
		t.Errorf("List reports launch time %s, want %s", got.LaunchedAt, in.LaunchedAt)
	}
	if _, err := os.Stat(filepath.Join(p.store.instanceDir(in.ID), "disk")); err != nil {
		t.Errorf("disk of the stuck instance: %v", err)
	}
	for _, sp := range procs {
		if sp.ignoresTerm && !sp.alive() {
			t.Fatalf("test is broken: process %d (%s), which ignores SIGTERM, died before the second Terminate", sp.pid, sp.what)
		}
	}
	if _, err := p.Stop(t.Context(), []string{in.ID}); err == nil {
		t.Error("Stop of a terminating instance succeeded")
	}
}

// checkFinished checks that a second Terminate, by p, finished the job.
func checkFinished(t *testing.T, p *Provider, in cloud.Instance, r *record, procs []stubbornProc) {
	t.Helper()
	for i := range 2 { // and the call after that is a no-op
		done, err := p.Terminate(t.Context(), []string{in.ID})
		if err != nil || !slices.Equal(done, []string{in.ID}) {
			t.Fatalf("Terminate #%d of the stuck instance = %v, %v; want [%s], nil", i+2, done, err, in.ID)
		}
		for _, sp := range procs {
			if sp.alive() {
				t.Errorf("after Terminate #%d: process %d (%s) is alive", i+2, sp.pid, sp.what)
			}
		}
		if pids := markedProcs(t, in.ID); len(pids) > 0 {
			t.Errorf("after Terminate #%d: processes %v with the instance's marker are alive", i+2, pids)
		}
		if pids := scanProcs(t, func(_ int, st procStat, _ []string) bool { return st.pgrp == r.PGID }); len(pids) > 0 {
			t.Errorf("after Terminate #%d: processes %v of the instance's group are alive", i+2, pids)
		}
		if _, err := os.Stat(p.store.instanceDir(in.ID)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("after Terminate #%d: instance directory: %v, want it removed", i+2, err)
		}
		if got := get(t, p, in.ID); got.State != cloud.StateTerminated || got.PrivateIP != "" {
			t.Errorf("after Terminate #%d: List reports %+v, want terminated without address", i+2, got)
		}
	}
	if ents, err := os.ReadDir(filepath.Join(p.store.dir, "trash")); err != nil || len(ents) > 0 {
		t.Errorf("trash after Terminate: %v, %v; want it empty", ents, err)
	}
}

// TestTerminateFinishesCrashedTerminate: a server that died right after its
// Terminate recorded terminating left the instance so, its processes all
// running. A new provider on the same directory lists it as terminating,
// and terminating it again ends its processes, removes its disk and
// records it terminated.
func TestTerminateFinishesCrashedTerminate(t *testing.T) {
	dir := t.TempDir()
	p1, err := New(t.Context(), Options{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { terminateAll(t, p1) })
	in, r, procs := launchStubborn(t, p1)

	// What the first Terminate writes before it signals anything.
	r.State, r.HaltingSince = cloud.StateTerminating, time.Now()
	if err := p1.store.putRecord(r); err != nil {
		t.Fatal(err)
	}
	if err := p1.Close(); err != nil {
		t.Fatal(err)
	}

	p2 := newTestProvider(t, Options{Dir: dir})
	checkStuck(t, p2, in, procs)
	checkFinished(t, p2, in, r, procs)
}

// The variables that make TestKilledTerminateHelper terminate instances in
// a local cloud.
const (
	killedTerminateDir = "HANGAR_LOCAL_TEST_KILLED_TERMINATE_DIR"
	killedTerminateIDs = "HANGAR_LOCAL_TEST_KILLED_TERMINATE_IDS"
)

// TestKilledTerminateHelper is the server of TestTerminateFinishesKilledTerminate,
// run in a process of its own that the test kills in the middle of Terminate.
func TestKilledTerminateHelper(t *testing.T) {
	dir := os.Getenv(killedTerminateDir)
	if dir == "" {
		t.Skip("run by TestTerminateFinishesKilledTerminate")
	}
	p, err := New(context.Background(), Options{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	done, err := p.Terminate(context.Background(), strings.Split(os.Getenv(killedTerminateIDs), ","))
	t.Fatalf("Terminate returned %v, %v before it was killed", done, err)
}

// TestTerminateFinishesKilledTerminate kills a server in the middle of its
// Terminate, after SIGTERM went out, while processes that ignore it are
// left. Terminating again from a new provider finishes the job.
func TestTerminateFinishesKilledTerminate(t *testing.T) {
	dir := t.TempDir()
	p1, err := New(t.Context(), Options{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { terminateAll(t, p1) })
	in, r, procs := launchStubborn(t, p1)
	b, err := os.ReadFile(filepath.Join(p1.store.instanceDir(in.ID), "disk", "sleep.pid"))
	if err != nil {
		t.Fatal(err)
	}
	sleepPID, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := p1.Close(); err != nil {
		t.Fatal(err)
	}

	var out bytes.Buffer
	cmd := exec.Command(os.Args[0], "-test.run=^TestKilledTerminateHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), killedTerminateDir+"="+dir, killedTerminateIDs+"="+in.ID)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	// Kill it once it has recorded terminating and sent SIGTERM (the
	// sleep, which does not ignore it, is gone), within its grace period.
	deadline := time.Now().Add(waitFor)
	for {
		cur, err := p1.store.getRecord(in.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.State == cloud.StateTerminating {
			if st, err := readStat(sleepPID); err != nil || st.state == 'Z' {
				break
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("test is broken: the server exited before it was killed: %v\n%s", err, out.Bytes())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("test is broken: after %s the instance is %s and sleep %d lives\n%s", waitFor, cur.State, sleepPID, out.Bytes())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := <-exited; err == nil {
		t.Fatal("the killed process exited 0")
	}
	cur, err := p1.store.getRecord(in.ID)
	if err != nil {
		t.Fatal(err)
	}
	if cur.State != cloud.StateTerminating || cur.HaltingSince.IsZero() {
		t.Fatalf("test is broken: the killed Terminate left the record %s since %s, want terminating since a time\n%s",
			cur.State, cur.HaltingSince, out.Bytes())
	}

	p2 := newTestProvider(t, Options{Dir: dir})
	checkStuck(t, p2, in, procs)
	checkFinished(t, p2, in, r, procs)
}

// TestTerminateRemovesDiskLeftByCrash: a server that died between writing
// the tombstone and moving the disk to the trash left the disk behind (its
// processes had ended before). Terminating again removes it.
func TestTerminateRemovesDiskLeftByCrash(t *testing.T) {
	dir := t.TempDir()
	p1, err := New(t.Context(), Options{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { terminateAll(t, p1) })
	in := launchOne(t, p1, "#!/bin/bash\necho started\nexec sleep 1000\n")
	waitConsole(t, p1, in.ID, "started")
	r, err := p1.store.getRecord(in.ID)
	if err != nil {
		t.Fatal(err)
	}
	// What the first Terminate does before the crash: record terminating,
	// end the processes, write the tombstone.
	r.State, r.HaltingSince = cloud.StateTerminating, time.Now()
	if err := p1.store.putRecord(r); err != nil {
		t.Fatal(err)
	}
	if left := endProcesses(t.Context(), []*record{r}, stopGrace); len(left) > 0 {
		t.Fatalf("processes survived: %v", left)
	}
	tomb := *r
	tomb.State, tomb.TerminatedAt, tomb.PrivateIP, tomb.PGID, tomb.LeaderStart = cloud.StateTerminated, time.Now(), "", 0, 0
	if err := writeJSON(p1.store.tombstonePath(in.ID), &tomb); err != nil {
		t.Fatal(err)
	}
	if err := p1.Close(); err != nil {
		t.Fatal(err)
	}

	p2 := newTestProvider(t, Options{Dir: dir})
	if got := get(t, p2, in.ID); got.State != cloud.StateTerminated {
		t.Errorf("List reports %s, want terminated", got.State)
	}
	if _, err := os.Stat(filepath.Join(p2.store.instanceDir(in.ID), "disk")); err != nil {
		t.Fatalf("test is broken: the disk is not there: %v", err)
	}
	for i := range 2 {
		done, err := p2.Terminate(t.Context(), []string{in.ID})
		if err != nil || !slices.Equal(done, []string{in.ID}) {
			t.Fatalf("Terminate #%d = %v, %v; want [%s], nil", i+2, done, err, in.ID)
		}
		if _, err := os.Stat(p2.store.instanceDir(in.ID)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("after Terminate #%d: instance directory: %v, want it removed", i+2, err)
		}
	}
	if ents, err := os.ReadDir(filepath.Join(dir, "trash")); err != nil || len(ents) > 0 {
		t.Errorf("trash after Terminate: %v, %v; want it empty", ents, err)
	}
}
