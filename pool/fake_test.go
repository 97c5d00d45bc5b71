package pool

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/userdata"
)

// fakeClock is a clock tests move by hand.
type fakeClock = testutil.FakeClock

func newFakeClock() *fakeClock { return testutil.NewFakeClock() }

// fakeCall is one call the fake cloud received.
type fakeCall struct {
	Op          string // launch | list | terminate | stop | start | console
	ClientToken string
	N           int    // instances asked for, of a launch
	UserData    []byte // of a launch
	IDs         []string
	Err         error
}

// fakeInstance is an instance of the fake cloud, with what it booted with.
type fakeInstance struct {
	cloud.Instance
	UserData    []byte
	ClientToken string
}

// fakeCloud is an in-memory cloud.Provider: instances with tags and states,
// EC2-style client-token idempotency, errors injectable per operation and a
// log of every call.
type fakeCloud struct {
	clock *fakeClock

	mu        sync.Mutex
	seq       int
	instances map[string]*fakeInstance
	tokens    map[string][]string // client token → the ids launched for it
	hidden    map[string]bool     // left out of List: an eventually consistent listing
	calls     []fakeCall
	failNext  map[string][]error // consumed one per call
	failAll   map[string]error   // every call until cleared
	// short, when positive, is how many instances the next launches start
	// at most: the rest fail with ErrCapacity, as a partial EC2 launch.
	short int
	// reverseIndex gives a launch's instances their launch indexes in
	// reverse order of their ids.
	reverseIndex bool
	// beforeLaunch runs before the cloud acts on a Launch; an error refuses
	// the launch. afterLaunch runs once the instances exist; an error loses
	// the answer (the instances stay). Both run without the fake's lock.
	beforeLaunch func(ctx context.Context, spec cloud.LaunchSpec) error
	afterLaunch  func(ctx context.Context, spec cloud.LaunchSpec) error
}

var _ cloud.Provider = (*fakeCloud)(nil)

func newFakeCloud(clock *fakeClock) *fakeCloud {
	return &fakeCloud{
		clock:     clock,
		instances: map[string]*fakeInstance{},
		tokens:    map[string][]string{},
		hidden:    map[string]bool{},
		failNext:  map[string][]error{},
		failAll:   map[string]error{},
	}
}

// injected returns the error to fail op with, if any. Caller holds f.mu.
func (f *fakeCloud) injected(op string) error {
	if q := f.failNext[op]; len(q) > 0 {
		f.failNext[op] = q[1:]
		return q[0]
	}
	return f.failAll[op]
}

// FailNext makes the next calls of op fail with errs, one each.
func (f *fakeCloud) FailNext(op string, errs ...error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failNext[op] = append(f.failNext[op], errs...)
}

// FailAll makes every call of op fail with err; nil clears it.
func (f *fakeCloud) FailAll(op string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failAll[op] = err
}

func (f *fakeCloud) SetBeforeLaunch(h func(ctx context.Context, spec cloud.LaunchSpec) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.beforeLaunch = h
}

func (f *fakeCloud) SetAfterLaunch(h func(ctx context.Context, spec cloud.LaunchSpec) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.afterLaunch = h
}

func (f *fakeCloud) record(c fakeCall) {
	f.calls = append(f.calls, c)
}

func (f *fakeCloud) Capabilities() cloud.Capabilities {
	return cloud.Capabilities{StopStart: true, ConsoleOutput: true}
}

func (f *fakeCloud) Launch(ctx context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	f.mu.Lock()
	before := f.beforeLaunch
	f.mu.Unlock()
	if before != nil {
		if err := before(ctx, spec); err != nil {
			f.mu.Lock()
			f.record(fakeCall{Op: "launch", ClientToken: spec.ClientToken, N: n, UserData: slices.Clone(spec.UserData), Err: err})
			f.mu.Unlock()
			return nil, err
		}
	}

	f.mu.Lock()
	out, err := f.launchLocked(spec, n)
	f.record(fakeCall{Op: "launch", ClientToken: spec.ClientToken, N: n, UserData: slices.Clone(spec.UserData), IDs: cloudIDs(out), Err: err})
	after := f.afterLaunch
	f.mu.Unlock()
	if len(out) == 0 {
		return nil, err
	}
	if after != nil {
		if err := after(ctx, spec); err != nil {
			return nil, err
		}
	}
	return out, err // a partial launch: those started, and why not the rest
}

// Short makes the next launches start at most n instances each (0: no
// limit); the rest fail for want of capacity.
func (f *fakeCloud) Short(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.short = n
}

// ReverseIndexes gives launched instances launch indexes in reverse
// order of their ids, so that answer order and index order differ.
func (f *fakeCloud) ReverseIndexes() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reverseIndex = true
}

func (f *fakeCloud) launchLocked(spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	if spec.ClientToken == "" {
		return nil, errors.New("launching fake instances: a client token is required")
	}
	if n < 1 {
		return nil, fmt.Errorf("launching fake instances: count %d is not positive", n)
	}
	if err := f.injected("launch"); err != nil {
		return nil, fmt.Errorf("launching fake instances: %w", err)
	}
	if known, ok := f.tokens[spec.ClientToken]; ok {
		var out []cloud.Instance
		for _, id := range known {
			out = append(out, f.copyOf(f.instances[id]))
		}
		return out, nil
	}
	typ := "fake.small"
	if len(spec.InstanceTypes) > 0 {
		typ = spec.InstanceTypes[0]
	}
	zone := "fake-1a"
	if len(spec.Zones) > 0 {
		zone = spec.Zones[0]
	}
	var out []cloud.Instance
	var short error
	if f.short > 0 && n > f.short {
		short = fmt.Errorf("launching fake instances: %d of %d started: %w", f.short, n, cloud.ErrCapacity)
		n = f.short
	}
	for i := range n {
		f.seq++
		index := i
		if f.reverseIndex {
			index = n - 1 - i
		}
		in := &fakeInstance{
			Instance: cloud.Instance{
				ID:          fmt.Sprintf("i-%04d", f.seq),
				State:       cloud.StateRunning,
				PrivateIP:   fmt.Sprintf("10.0.0.%d", f.seq),
				Type:        typ,
				Zone:        zone,
				Image:       spec.Image,
				Tags:        maps.Clone(spec.Tags),
				LaunchedAt:  f.clock.Now(),
				LaunchIndex: index,
			},
			UserData:    slices.Clone(spec.UserData),
			ClientToken: spec.ClientToken,
		}
		f.instances[in.ID] = in
		f.tokens[spec.ClientToken] = append(f.tokens[spec.ClientToken], in.ID)
		out = append(out, f.copyOf(in))
	}
	return out, short
}

func (f *fakeCloud) copyOf(in *fakeInstance) cloud.Instance {
	c := in.Instance
	c.Tags = maps.Clone(in.Tags)
	return c
}

func (f *fakeCloud) List(ctx context.Context, tags map[string]string) ([]cloud.Instance, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := ctx.Err()
	if err == nil {
		err = f.injected("list")
	}
	f.record(fakeCall{Op: "list", Err: err})
	if err != nil {
		return nil, fmt.Errorf("listing fake instances: %w", err)
	}
	var out []cloud.Instance
	for _, id := range slices.Sorted(maps.Keys(f.instances)) {
		in := f.instances[id]
		if !f.hidden[id] && cloud.MatchesTags(in.Tags, tags) {
			out = append(out, f.copyOf(in))
		}
	}
	return out, nil
}

func (f *fakeCloud) Terminate(ctx context.Context, idList []string) ([]string, error) {
	return f.act("terminate", idList, func(in *fakeInstance) error {
		in.State = cloud.StateTerminated
		return nil
	})
}

func (f *fakeCloud) Stop(ctx context.Context, idList []string) ([]string, error) {
	return f.act("stop", idList, func(in *fakeInstance) error {
		if in.State != cloud.StateRunning && in.State != cloud.StateStopped {
			return fmt.Errorf("instance %s is %s", in.ID, in.State)
		}
		in.State = cloud.StateStopped
		return nil
	})
}

func (f *fakeCloud) Start(ctx context.Context, idList []string) ([]string, error) {
	return f.act("start", idList, func(in *fakeInstance) error {
		if in.State != cloud.StateRunning && in.State != cloud.StateStopped {
			return fmt.Errorf("instance %s is %s", in.ID, in.State)
		}
		in.State = cloud.StateRunning
		return nil
	})
}

// act applies do to each instance. Terminate counts an unknown id as ended;
// the others fail it with ErrNotFound.
func (f *fakeCloud) act(op string, idList []string, do func(*fakeInstance) error) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected(op); err != nil {
		err = fmt.Errorf("%s fake instances: %w", op, err)
		f.record(fakeCall{Op: op, IDs: slices.Clone(idList), Err: err})
		return nil, err
	}
	var ok []string
	var errs []error
	for _, id := range idList {
		in, found := f.instances[id]
		switch {
		case !found && op == "terminate":
			ok = append(ok, id)
		case !found:
			errs = append(errs, fmt.Errorf("instance %s: %w", id, cloud.ErrNotFound))
		default:
			if err := do(in); err != nil {
				errs = append(errs, err)
				continue
			}
			ok = append(ok, id)
		}
	}
	err := errors.Join(errs...)
	f.record(fakeCall{Op: op, IDs: slices.Clone(idList), Err: err})
	return ok, err
}

func (f *fakeCloud) ConsoleOutput(ctx context.Context, id string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(fakeCall{Op: "console", IDs: []string{id}})
	if _, ok := f.instances[id]; !ok {
		return nil, fmt.Errorf("instance %s: %w", id, cloud.ErrNotFound)
	}
	return []byte("console of " + id + "\n"), nil
}

func (f *fakeCloud) Close() error { return nil }

// Add puts an instance into the cloud as if someone else had launched it.
func (f *fakeCloud) Add(tags map[string]string, state cloud.State) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seq++
	id := fmt.Sprintf("i-%04d", f.seq)
	f.instances[id] = &fakeInstance{Instance: cloud.Instance{
		ID: id, State: state, Tags: maps.Clone(tags), LaunchedAt: f.clock.Now(), PrivateIP: fmt.Sprintf("10.0.0.%d", f.seq),
	}}
	return id
}

// SetState changes what the cloud says about an instance, as if it had
// changed outside Hangar.
func (f *fakeCloud) SetState(id string, s cloud.State) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.instances[id].State = s
}

// Remove makes an instance vanish from the cloud without a trace.
func (f *fakeCloud) Remove(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.instances, id)
}

// Hide leaves an instance out of (hide) or puts it back into List.
func (f *fakeCloud) Hide(id string, hide bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hidden[id] = hide
}

// Instance returns the cloud's view of id.
func (f *fakeCloud) Instance(id string) (fakeInstance, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	in, ok := f.instances[id]
	if !ok {
		return fakeInstance{}, false
	}
	c := *in
	c.Instance = f.copyOf(in)
	return c, true
}

// Running returns the ids of instances not terminated, sorted.
func (f *fakeCloud) Running() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for id, in := range f.instances {
		if in.State != cloud.StateTerminated && in.State != cloud.StateTerminating {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Launched returns the ids launched for a client token.
func (f *fakeCloud) Launched(clientToken string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.tokens[clientToken])
}

// Calls returns the calls of op ("" for all) made so far.
func (f *fakeCloud) Calls(op string) []fakeCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []fakeCall
	for _, c := range f.calls {
		if op == "" || c.Op == op {
			out = append(out, c)
		}
	}
	return out
}

// Count returns how many calls of op were made.
func (f *fakeCloud) Count(op string) int { return len(f.Calls(op)) }

// Terminated reports whether a Terminate call named id.
func (f *fakeCloud) Terminated(id string) bool {
	for _, c := range f.Calls("terminate") {
		if slices.Contains(c.IDs, id) {
			return true
		}
	}
	return false
}

// BootstrapToken returns the bootstrap token an instance booted with, read
// from its user-data the way the instance itself would.
func (f *fakeCloud) BootstrapToken(id string) (string, error) {
	in, ok := f.Instance(id)
	if !ok {
		return "", fmt.Errorf("no instance %s", id)
	}
	if token, ok := userdata.Exports(in.UserData)["HANGAR_BOOTSTRAP_TOKEN"]; ok {
		return token, nil
	}
	return "", fmt.Errorf("instance %s: no bootstrap token in its user-data", id)
}

func cloudIDs(list []cloud.Instance) []string {
	out := make([]string, len(list))
	for i, c := range list {
		out[i] = c.ID
	}
	return out
}
