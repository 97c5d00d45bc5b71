package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/internal/shell"
)

// A run is a command run on a lease's instance through its bootstrap
// (`hangar run`): the assignment carries it, the bootstrap runs it in place
// of the worker and streams its merged stdout and stderr back (OpenOutput),
// then reports its exit status (Exit); the lease holder reads both with
// Output. A lease made with a command has run 1; StartRun adds more, one at
// a time.
//
// The output lives in this process's memory only: a server restart loses
// what was not read yet (a marker says so), though the run goes on and its
// exit status still arrives. The server keeps the last MaxOutput bytes of
// each run; a reader that falls further behind is told how many it missed.

// Run is a command for a lease's instance.
type Run struct {
	ID      int      `json:"id"` // 1, 2, … within its lease
	Command []string `json:"command"`
}

// RunView is a run as a lease's view shows it: not its command, which may
// hold secrets (a GitLab job's script does).
type RunView struct {
	ID int `json:"id"`
}

// RunState is where a run is, as its output shows it.
type RunState string

const (
	RunStarting RunState = "starting" // its output has not begun to arrive
	RunRunning  RunState = "running"  // its output is arriving
	RunExited   RunState = "exited"   // its exit status is in: the output is complete
)

const (
	// MaxOutput is how much of a run's output the server keeps.
	MaxOutput = 16 << 20
	// maxOutputRead caps the bytes one Output call returns.
	maxOutputRead = 1 << 20
	// MaxArg is the most one argument can hold: Linux's MAX_ARG_STRLEN,
	// less the NUL.
	MaxArg = 128<<10 - 1
	// MaxCommand bounds a whole command; it is kept in the lease record.
	MaxCommand = 256 << 10
	maxArgs    = 4096
)

const restartMarker = "[hangar: the Hangar server restarted during this run; its output up to here is lost]\n"

// ErrLeaseBusy: the lease cannot take a run now (pending, or a run under way).
var ErrLeaseBusy = errors.New("lease is busy")

// commandProblems checks a command; none is fine (a lease without one).
func commandProblems(argv []string) []error {
	if len(argv) == 0 {
		return nil
	}
	var problems []error
	bad := func(format string, a ...any) { problems = append(problems, fmt.Errorf(format, a...)) }
	if len(argv) > maxArgs {
		bad("command has %d arguments; at most %d", len(argv), maxArgs)
	}
	if argv[0] == "" {
		bad("command[0], the program to run, must not be empty")
	}
	total, nul, long := 0, -1, -1
	for i, a := range argv {
		total += len(a)
		if nul < 0 && strings.IndexByte(a, 0) >= 0 {
			nul = i
		}
		if long < 0 && len(a) > MaxArg {
			long = i
		}
	}
	if nul >= 0 {
		bad("command[%d] holds a NUL byte, which no argument can carry", nul)
	}
	if long >= 0 {
		bad("command[%d] is %d bytes; Linux passes at most %d bytes in one argument", long, len(argv[long]), MaxArg)
	}
	if total > MaxCommand {
		bad("command is %d bytes in all; at most %d", total, MaxCommand)
	}
	return problems
}

// shellCommand is argv as one shell command line.
func shellCommand(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = shell.Quote(a)
	}
	return strings.Join(q, " ")
}

// runOutput is one run's output and status. Lock order: m.mu, then mu.
type runOutput struct {
	id    int
	epoch string // tells a reader that offsets started over (restart)
	max   int

	mu       sync.Mutex
	buf      []byte
	start    int64 // the offset of buf[0]; earlier bytes were dropped
	state    RunState
	exitCode int
	ended    bool          // the lease ended or a later run replaced this one
	changed  chan struct{} // closed and replaced on every change
}

func (m *Manager) newRunOutput(id int, prefix string) *runOutput {
	r := &runOutput{id: id, epoch: randomToken(6), max: m.maxOutput, state: RunStarting, changed: make(chan struct{})}
	r.buf = append(r.buf, prefix...)
	return r
}

// notify wakes the readers. Caller holds r.mu.
func (r *runOutput) notify() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// runLocked returns the output of l's latest run. Caller holds m.mu.
func (m *Manager) runLocked(l *Lease) *runOutput {
	r := m.runs[l.ID]
	if r == nil || r.id != l.Run.ID {
		r = m.newRunOutput(l.Run.ID, "")
		m.runs[l.ID] = r
	}
	return r
}

// runExitedLocked reports whether l's latest run has exited. Caller holds m.mu.
func (m *Manager) runExitedLocked(l *Lease) bool {
	r := m.runs[l.ID]
	if r == nil || r.id != l.Run.ID {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state == RunExited
}

// endRunLocked drops the output of lease id's run: the lease is over.
func (m *Manager) endRunLocked(id string) {
	r := m.runs[id]
	if r == nil {
		return
	}
	r.mu.Lock()
	r.ended, r.buf = true, nil
	r.notify()
	r.mu.Unlock()
	delete(m.runs, id)
}

// StartRun runs command on the instance of active lease id, once its
// previous run, if any, has exited.
func (m *Manager) StartRun(ctx context.Context, c Caller, id string, command []string) (LeaseView, error) {
	if len(command) == 0 {
		return LeaseView{}, fmt.Errorf("%w: command is required", ErrInvalid)
	}
	if p := commandProblems(command); len(p) > 0 {
		return LeaseView{}, fmt.Errorf("%w: %w", ErrInvalid, errors.Join(p...))
	}
	m.mu.Lock()
	l, err := m.leaseLocked(c, id)
	if err != nil {
		m.unlock()
		return LeaseView{}, err
	}
	switch {
	case l.State == LeasePending:
		m.unlock()
		return LeaseView{}, fmt.Errorf("%w: %s is pending; a run needs an instance", ErrLeaseBusy, id)
	case l.State.ended():
		m.unlock()
		return LeaseView{}, fmt.Errorf("%w: %s is %s", ErrLeaseEnded, id, l.State)
	}
	next := 1
	if l.Run != nil {
		r := m.runLocked(l)
		r.mu.Lock()
		running := r.state != RunExited
		r.mu.Unlock()
		if running {
			m.unlock()
			return LeaseView{}, fmt.Errorf("%w: run %d of %s has not exited yet", ErrLeaseBusy, l.Run.ID, id)
		}
		m.endRunLocked(id)
		next = l.Run.ID + 1
	}
	l.Run = &Run{ID: next, Command: slices.Clone(command)}
	l.Unclaimed = false
	m.runLocked(l)
	m.saveLease(l)
	m.wakeInstance(m.instances[l.InstanceKey]) // its assignment poll
	m.notify()
	m.log.Info("run started", "pool", l.Pool, "lease", l.ID, "run", next)
	v := m.viewLocked(l)
	saved := m.synced()
	m.unlock()
	if err := saved.Wait(); err != nil {
		return LeaseView{}, fmt.Errorf("saving lease %s: %w", id, err)
	}
	return v, nil
}

// RunOutput is a piece of a run's output.
type RunOutput struct {
	Run    int
	Data   []byte
	Offset int64 // where Data starts
	Next   int64 // the offset to ask for next
	// Skipped bytes between the offset asked for and Offset are no longer
	// kept: the reader fell more than MaxOutput behind.
	Skipped int64
	// Epoch names this server's copy of the output. Reset: the epoch asked
	// for is gone (a restart), and offsets started over.
	Epoch    string
	Reset    bool
	State    RunState
	Done     bool // exited, and Data reaches the end: ExitCode is final
	ExitCode int
}

// Output returns lease id's run output from offset, waiting up to wait for
// some to arrive. run 0 means the latest; only the latest run's output is
// kept. epoch is the Epoch of an earlier answer, or "".
func (m *Manager) Output(ctx context.Context, c Caller, id string, run int, offset int64, epoch string, wait time.Duration) (RunOutput, error) {
	if offset < 0 || run < 0 {
		return RunOutput{}, fmt.Errorf("%w: offset and run must not be negative", ErrInvalid)
	}
	if wait < 0 || wait > MaxWait {
		return RunOutput{}, fmt.Errorf("%w: wait must be between 0s and %s", ErrInvalid, MaxWait)
	}
	deadline := m.clock.NewTimer(wait)
	defer deadline.Stop()
	for {
		m.mu.Lock()
		l, err := m.leaseLocked(c, id)
		switch {
		case err != nil:
		case l.Run == nil:
			err = fmt.Errorf("%w: lease %s has no command", ErrInvalid, id)
		case run != 0 && run != l.Run.ID:
			err = fmt.Errorf("%w: run %d of lease %s is over: only the output of its latest run (%d) is kept", ErrInvalid, run, id, l.Run.ID)
		case l.State == LeasePending:
			err = fmt.Errorf("%w: %s is pending; its command has not started", ErrLeaseBusy, id)
		case l.State.ended():
			err = fmt.Errorf("%w: %s is %s; the output of its command is no longer kept", ErrLeaseEnded, id, l.State)
		}
		if err != nil {
			m.unlock()
			return RunOutput{}, err
		}
		r := m.runLocked(l)
		m.unlock()

		r.mu.Lock()
		if r.ended {
			// The lease ended or the run was replaced since: say which.
			r.mu.Unlock()
			continue
		}
		out, err := r.readLocked(offset, epoch)
		changed := r.changed
		r.mu.Unlock()
		if err != nil {
			return RunOutput{}, err
		}
		if len(out.Data) > 0 || out.Done || out.Reset || out.Skipped > 0 {
			return out, nil
		}
		select {
		case <-changed:
		case <-deadline.C():
			return out, nil
		case <-ctx.Done():
			return out, nil
		}
	}
}

func (r *runOutput) readLocked(offset int64, epoch string) (RunOutput, error) {
	out := RunOutput{Run: r.id, Epoch: r.epoch, State: r.state}
	end := r.start + int64(len(r.buf))
	switch {
	case epoch != "" && epoch != r.epoch:
		out.Reset, offset = true, r.start
	case offset < r.start:
		out.Skipped, offset = r.start-offset, r.start
	case offset > end:
		return RunOutput{}, fmt.Errorf("%w: offset %d is past the end of the output (%d)", ErrInvalid, offset, end)
	}
	n := min(end-offset, maxOutputRead)
	i := offset - r.start
	out.Data = slices.Clone(r.buf[i : i+n])
	out.Offset, out.Next = offset, offset+n
	if r.state == RunExited && out.Next == end {
		out.Done, out.ExitCode = true, r.exitCode
	}
	return out, nil
}

// runForInstanceLocked returns the output of run of lease, which must be
// a run of in's current lease that has not exited. Caller holds m.mu.
func (m *Manager) runForInstanceLocked(in *Instance, lease string, run int) (*runOutput, *Lease, error) {
	l := m.leases[lease]
	if l == nil || in.LeaseID != lease || l.State != LeaseActive || l.Run == nil || l.Run.ID != run {
		return nil, nil, fmt.Errorf("run %d of lease %s on %s: %w", run, lease, in.name(), bootstrap.ErrNotCurrent)
	}
	return m.runLocked(l), l, nil
}

// OpenOutput implements bootstrap.Backend.
func (m *Manager) OpenOutput(ctx context.Context, key, lease string, run int) (io.Writer, error) {
	m.mu.Lock()
	defer m.unlock()
	in, err := m.instanceLocked(key)
	if err != nil {
		return nil, err
	}
	in.LastSeen = m.clock.Now()
	r, _, err := m.runForInstanceLocked(in, lease, run)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == RunExited {
		return nil, fmt.Errorf("run %d of lease %s has exited: %w", run, lease, bootstrap.ErrNotCurrent)
	}
	if r.state == RunStarting {
		r.state = RunRunning
		r.notify()
	}
	return runWriter{r}, nil
}

// runWriter appends to a run's output until the run exits or its lease ends.
type runWriter struct{ r *runOutput }

func (w runWriter) Write(p []byte) (int, error) {
	r := w.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ended || r.state == RunExited {
		return 0, fmt.Errorf("run %d is over: %w", r.id, bootstrap.ErrNotCurrent)
	}
	r.buf = append(r.buf, p...)
	if len(r.buf) > r.max {
		// Drop a quarter at a time, so that a long run's steady stream
		// does not move the whole buffer on every write.
		drop := len(r.buf) - r.max*3/4
		r.buf = r.buf[:copy(r.buf, r.buf[drop:])]
		r.start += int64(drop)
	}
	r.state = RunRunning
	r.notify()
	return len(p), nil
}

// Exit implements bootstrap.Backend.
func (m *Manager) Exit(ctx context.Context, key, lease string, run, code int) error {
	m.mu.Lock()
	defer m.unlock()
	in, err := m.instanceLocked(key)
	if err != nil {
		return err
	}
	in.LastSeen = m.clock.Now()
	return m.exitLocked(in, lease, run, code)
}

func (m *Manager) exitLocked(in *Instance, lease string, run, code int) error {
	r, l, err := m.runForInstanceLocked(in, lease, run)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == RunExited {
		if r.exitCode == code {
			return nil
		}
		return fmt.Errorf("run %d of lease %s already exited with status %d: %w", run, lease, r.exitCode, bootstrap.ErrNotCurrent)
	}
	r.state, r.exitCode = RunExited, code
	r.notify()
	m.log.Info("run exited", "pool", l.Pool, "lease", l.ID, "run", run, "instance", in.ID, "exit_code", code)
	return nil
}
