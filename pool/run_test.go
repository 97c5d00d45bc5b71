package pool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
)

// output reads a run's output without waiting.
func (h *harness) output(id string, offset int64, epoch string) RunOutput {
	h.t.Helper()
	out, err := h.m.Output(context.Background(), Admin, id, 0, offset, epoch, 0)
	if err != nil {
		h.t.Fatalf("output of %s from %d: %v", id, offset, err)
	}
	return out
}

func (h *harness) write(id, lease string, run int, data string) {
	h.t.Helper()
	w, err := h.m.OpenOutput(context.Background(), h.key(id), lease, run)
	if err != nil {
		h.t.Fatalf("opening the output of run %d of %s from %s: %v", run, lease, id, err)
	}
	if _, err := w.Write([]byte(data)); err != nil {
		h.t.Fatalf("writing the output of run %d of %s: %v", run, lease, err)
	}
}

// A lease made with a command hands the instance the command, quoted, in
// place of the worker; the output arrives in order, long-polls wake for it,
// and the exit status comes only with the last byte.
func TestRunLifecycle(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.WorkerCommand = "run-the-worker" })
	ids := h.warm(2)
	argv := []string{"printf", "%s\n", "'; rm -rf / #", "$(id)", ""}
	v, inst := h.leaseOn(LeaseRequest{Command: argv})
	other := ids[0]
	if other == inst {
		other = ids[1]
	}
	if v.Run == nil || v.Run.ID != 1 {
		t.Fatalf("lease view run = %+v", v.Run)
	}
	a := h.poll(inst, "", 0)
	want := `'printf' '%s
' ''\''; rm -rf / #' '$(id)' ''`
	if a.State != bootstrap.AssignAssigned || a.RunID != 1 || a.RunCommand != want || a.WorkerCommand != "" {
		t.Fatalf("assignment = %+v; want run 1 %q and no worker", a, want)
	}
	if a := h.pollRun(inst, v.ID, 1); a.State != bootstrap.AssignNone {
		t.Fatalf("poll after taking run 1: %q, want none", a.State)
	}

	// Nothing yet: a long-poll waits, and wakes when output arrives.
	if out := h.output(v.ID, 0, ""); len(out.Data) != 0 || out.State != RunStarting || out.Done {
		t.Fatalf("output before the run started = %+v", out)
	}
	got := make(chan RunOutput, 1)
	go func() {
		out, err := h.m.Output(context.Background(), Admin, v.ID, 0, 0, "", time.Minute)
		if err != nil {
			t.Errorf("long-poll: %v", err)
		}
		got <- out
	}()
	h.write(inst, v.ID, 1, "first\n")
	out := <-got
	if string(out.Data) != "first\n" || out.Offset != 0 || out.Next != 6 || out.State != RunRunning {
		t.Fatalf("long-poll answer = %+v", out)
	}
	epoch := out.Epoch
	h.write(inst, v.ID, 1, "second\n")

	// Only the instance of the lease writes to it, and only its current run.
	key := h.key(inst)
	for _, c := range []struct {
		name, key, lease string
		run              int
	}{
		{"another instance", h.key(other), v.ID, 1},
		{"an unknown lease", key, "l-nope", 1},
		{"a run that does not exist", key, v.ID, 2},
	} {
		if _, err := h.m.OpenOutput(context.Background(), c.key, c.lease, c.run); !errors.Is(err, bootstrap.ErrNotCurrent) {
			t.Errorf("output from %s: %v, want ErrNotCurrent", c.name, err)
		}
		if err := h.m.Exit(context.Background(), c.key, c.lease, c.run, 0); !errors.Is(err, bootstrap.ErrNotCurrent) {
			t.Errorf("exit from %s: %v, want ErrNotCurrent", c.name, err)
		}
	}

	if err := h.m.Exit(context.Background(), key, v.ID, 1, 3); err != nil {
		t.Fatal(err)
	}
	if err := h.m.Exit(context.Background(), key, v.ID, 1, 3); err != nil {
		t.Errorf("the same exit again: %v", err)
	}
	if err := h.m.Exit(context.Background(), key, v.ID, 1, 4); !errors.Is(err, bootstrap.ErrNotCurrent) {
		t.Errorf("another exit status: %v, want ErrNotCurrent", err)
	}
	if _, err := h.m.OpenOutput(context.Background(), key, v.ID, 1); !errors.Is(err, bootstrap.ErrNotCurrent) {
		t.Errorf("output after exit: %v, want ErrNotCurrent", err)
	}
	out = h.output(v.ID, 6, epoch)
	if string(out.Data) != "second\n" || !out.Done || out.ExitCode != 3 || out.State != RunExited || out.Reset {
		t.Fatalf("last output = %+v", out)
	}
	if out := h.output(v.ID, 0, epoch); string(out.Data) != "first\nsecond\n" || !out.Done {
		t.Errorf("output read again from 0 = %+v", out)
	}
	if _, err := h.m.Output(context.Background(), Admin, v.ID, 0, 100, epoch, 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("offset past the end: %v, want ErrInvalid", err)
	}
	// An exited run is never handed out again.
	if a := h.poll(inst, "", 0); a.State != bootstrap.AssignAssigned || a.RunID != 0 || a.WorkerCommand != "" {
		t.Errorf("a bootstrap that lost track polls again: %+v; want the lease without its run or a worker", a)
	}

	h.release(v.ID, false)
	if _, err := h.m.Output(context.Background(), Admin, v.ID, 0, 0, "", 0); !errors.Is(err, ErrLeaseEnded) {
		t.Errorf("output after release: %v, want ErrLeaseEnded", err)
	}
	if err := h.m.Exit(context.Background(), key, v.ID, 1, 3); !errors.Is(err, bootstrap.ErrNotCurrent) {
		t.Errorf("exit after release: %v, want ErrNotCurrent", err)
	}
}

// A writer opened for a run fails once its lease ends, and a long-poll
// waiting on it answers with the end.
func TestRunEndsWithLease(t *testing.T) {
	h := newHarness(t, nil)
	h.warm(1)
	v, inst := h.leaseOn(LeaseRequest{Command: []string{"sleep", "600"}})
	w, err := h.m.OpenOutput(context.Background(), h.key(inst), v.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := h.m.Output(context.Background(), Admin, v.ID, 0, 0, "", time.Minute)
		done <- err
	}()
	h.release(v.ID, true)
	if err := <-done; !errors.Is(err, ErrLeaseEnded) {
		t.Errorf("long-poll across the release: %v, want ErrLeaseEnded", err)
	}
	if _, err := w.Write([]byte("late")); !errors.Is(err, bootstrap.ErrNotCurrent) {
		t.Errorf("write after release: %v, want ErrNotCurrent", err)
	}
}

// The server keeps the last maxOutput bytes; a reader that fell behind is
// told how many it missed, and no answer is larger than maxOutputRead.
func TestRunOutputBounded(t *testing.T) {
	h := newHarness(t, nil)
	h.m.maxOutput = 1000
	h.warm(2)
	v, inst := h.leaseOn(LeaseRequest{Command: []string{"yes"}})
	var all bytes.Buffer
	for i := range 30 {
		chunk := strings.Repeat(string(rune('a'+i%26)), 100)
		all.WriteString(chunk)
		h.write(inst, v.ID, 1, chunk)
	}
	out := h.output(v.ID, 0, "")
	if out.Skipped == 0 || out.Offset != out.Skipped || out.Next != 3000 {
		t.Fatalf("reader at 0 after 3000 bytes: offset %d, skipped %d, next %d", out.Offset, out.Skipped, out.Next)
	}
	if !bytes.Equal(out.Data, all.Bytes()[out.Offset:]) || len(out.Data) > 1000 {
		t.Errorf("kept %d bytes, not the tail of the output", len(out.Data))
	}
	// A reader that keeps up misses nothing.
	if out := h.output(v.ID, 2900, out.Epoch); out.Skipped != 0 || string(out.Data) != strings.Repeat("d", 100) {
		t.Errorf("reader at 2900: %+v", out)
	}

	h.m.maxOutput = 8 << 20
	big, inst2 := h.leaseOn(LeaseRequest{Command: []string{"yes"}})
	h.write(inst2, big.ID, 1, strings.Repeat("x", maxOutputRead+10))
	if out := h.output(big.ID, 0, ""); len(out.Data) != maxOutputRead || out.Next != maxOutputRead {
		t.Errorf("a large read returned %d bytes, next %d; want %d", len(out.Data), out.Next, maxOutputRead)
	}
}

// pollRun is one assignment poll of instance id by a bootstrap that takes
// runs and has started run of current (-1: one that does not take runs).
func (h *harness) pollRun(id, current string, run int) bootstrap.Assignment {
	h.t.Helper()
	a, err := h.m.Assignment(context.Background(), h.key(id), bootstrap.Poll{Current: current, Run: run})
	if err != nil {
		h.t.Fatalf("assignment %s: %v", id, err)
	}
	return a
}

// More runs on one lease, one at a time; a bootstrap that does not know
// runs (run = -1) is never asked for a second one.
func TestRunsOnHeldLease(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.WorkerCommand = "run-the-worker" })
	h.warm(1)
	v, inst := h.leaseOn(LeaseRequest{})
	if _, err := h.m.Output(context.Background(), Admin, v.ID, 0, 0, "", 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("output of a lease without a command: %v, want ErrInvalid", err)
	}
	r1, err := h.m.StartRun(context.Background(), Admin, v.ID, []string{"make", "test"})
	if err != nil || r1.Run == nil || r1.Run.ID != 1 {
		t.Fatalf("first run: %+v, %v", r1.Run, err)
	}
	// The instance takes the lease and starts its worker first, even when
	// the run came before its poll.
	if a := h.poll(inst, "", 0); a.WorkerCommand != "run-the-worker" || a.RunID != 0 {
		t.Fatalf("plain lease assignment = %+v", a)
	}
	if a := h.pollRun(inst, v.ID, -1); a.State != bootstrap.AssignNone {
		t.Errorf("a bootstrap without runs was asked: %+v", a)
	}
	a := h.pollRun(inst, v.ID, 0)
	if a.State != bootstrap.AssignAssigned || a.LeaseID != v.ID || a.RunID != 1 || a.RunCommand != "'make' 'test'" || a.WorkerCommand != "run-the-worker" {
		t.Fatalf("one more run on the lease held: %+v", a)
	}
	if _, err := h.m.StartRun(context.Background(), Admin, v.ID, []string{"true"}); !errors.Is(err, ErrLeaseBusy) {
		t.Errorf("a second run while the first runs: %v, want ErrLeaseBusy", err)
	}
	h.write(inst, v.ID, 1, "one\n")
	if err := h.m.Exit(context.Background(), h.key(inst), v.ID, 1, 0); err != nil {
		t.Fatal(err)
	}
	r2, err := h.m.StartRun(context.Background(), Admin, v.ID, []string{"true"})
	if err != nil || r2.Run.ID != 2 {
		t.Fatalf("second run: %+v, %v", r2.Run, err)
	}
	if _, err := h.m.Output(context.Background(), Admin, v.ID, 1, 0, "", 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("output of the replaced run 1: %v, want ErrInvalid", err)
	}
	if out := h.output(v.ID, 0, ""); out.Run != 2 || len(out.Data) != 0 || out.State != RunStarting {
		t.Errorf("output of run 2 = %+v", out)
	}
	if a := h.pollRun(inst, v.ID, 1); a.RunID != 2 {
		t.Errorf("poll after run 1: %+v, want run 2", a)
	}

	pending := h.lease(LeaseRequest{})
	for _, c := range []struct {
		name, id string
		argv     []string
		want     error
	}{
		{"pending lease", pending.ID, []string{"true"}, ErrLeaseBusy},
		{"unknown lease", "l-nope", []string{"true"}, ErrUnknownLease},
		{"no command", v.ID, nil, ErrInvalid},
	} {
		if _, err := h.m.StartRun(context.Background(), Admin, c.id, c.argv); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	h.release(pending.ID, false)
	if _, err := h.m.StartRun(context.Background(), Admin, pending.ID, []string{"true"}); !errors.Is(err, ErrLeaseEnded) {
		t.Errorf("ended lease: %v, want ErrLeaseEnded", err)
	}
}

// Output lives in memory: after a restart the run goes on, its output says
// what was lost and readers see the reset; an exit status the restart lost
// comes back with the instance's heartbeat.
func TestRunAcrossRestart(t *testing.T) {
	h := newHarness(t, nil)
	h.warm(1)
	v, inst := h.leaseOn(LeaseRequest{Command: []string{"make"}})
	h.write(inst, v.ID, 1, "before\n")
	old := h.output(v.ID, 0, "")
	h.restart()

	if got := h.getLease(v.ID); got.State != LeaseActive || got.Run == nil || got.Run.ID != 1 {
		t.Fatalf("lease after restart = %+v", got)
	}
	if a := h.poll(inst, "", 0); a.RunCommand != "'make'" {
		t.Errorf("the run's command after restart: %q", a.RunCommand)
	}
	h.write(inst, v.ID, 1, "after\n")
	out := h.output(v.ID, old.Next, old.Epoch)
	if !out.Reset || out.Offset != 0 || string(out.Data) != restartMarker+"after\n" {
		t.Fatalf("output after restart = %+v (data %q)", out, out.Data)
	}
	hb := bootstrap.Heartbeat{LeaseID: v.ID, Worker: "none", RunID: 1, RunExitCode: 2}
	if err := h.m.Heartbeat(context.Background(), h.key(inst), hb); err != nil {
		t.Fatal(err)
	}
	if out := h.output(v.ID, out.Next, out.Epoch); !out.Done || out.ExitCode != 2 {
		t.Errorf("after the heartbeat: %+v, want exited 2", out)
	}
}

// Lease records from before runs existed still load.
func TestLeaseRecordWithoutRun(t *testing.T) {
	var l Lease
	old := `{"id":"l-1","pool":"demo","state":"active","instance_key":"h-1","worker":{"name":"w"},"ttl":3600000000000,"created_at":"2026-01-01T00:00:00Z","expires_at":"2026-01-01T01:00:00Z"}`
	if err := json.Unmarshal([]byte(old), &l); err != nil || l.Run != nil || l.NoWorker {
		t.Errorf("old record: %+v, %v", l, err)
	}
}

func TestCommandValidation(t *testing.T) {
	cases := []struct {
		name string
		argv []string
		want string // "" for valid
	}{
		{"none", nil, ""},
		{"plain", []string{"make", "-j4", "all"}, ""},
		{"hostile but fine", []string{"sh", "-c", "'; rm -rf / #", "$(id)", "a\nb", ""}, ""},
		{"empty program", []string{"", "x"}, "command[0], the program to run, must not be empty"},
		{"NUL", []string{"echo", "a\x00b"}, "command[1] holds a NUL byte, which no argument can carry"},
		{"one huge argument", []string{"echo", strings.Repeat("x", MaxArg+1)}, "command[1] is 131072 bytes; Linux passes at most 131071 bytes in one argument"},
		{"too much in all", []string{"echo", strings.Repeat("x", MaxArg), strings.Repeat("x", MaxArg), strings.Repeat("x", 10)}, "command is 262156 bytes in all; at most 262144"},
		{"too many arguments", make([]string, maxArgs+1), "command has 4097 arguments; at most 4096\ncommand[0], the program to run, must not be empty"},
	}
	for _, c := range cases {
		err := validateRequest(LeaseRequest{Pool: "demo", Command: c.argv}, time.Hour)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.want != "" && (err == nil || !errors.Is(err, ErrInvalid) || !strings.HasSuffix(err.Error(), c.want)):
			t.Errorf("%s: %v; want an ErrInvalid ending %q", c.name, err, c.want)
		}
	}
}
