package pool

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool/store"
)

// writeRecords puts records into the harness's store while no Manager has
// it open, as a torn write or an older version would have left them.
func (h *harness) writeRecords(ops ...store.Op) {
	h.t.Helper()
	h.shutdown()
	s, err := store.Open(h.path)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := s.CommitWait(ops...); err != nil {
		h.t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		h.t.Fatal(err)
	}
	h.open()
}

// Restore mends batch records that break the invariants: an intent whose
// batch is missing is dropped rather than launched, a dead batch's token
// stays dead, and a batch whose every slot is gone loses its token.
func TestBatchRestoreRepairs(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5 })
	now := h.clock.Now()
	lost := &Instance{Key: "h-lost", Pool: "demo", State: Launching, Since: now, IntentAt: now, Batch: "b-missing", Slot: 0}
	ended := &Instance{Key: "h-ended", Pool: "demo", State: Gone, Since: now, IntentAt: now, Batch: "b-done", Slot: 0}
	done := &Batch{Key: "b-done", Pool: "demo", Slots: []string{"h-ended"}, TokenHash: "live-hash", IntentAt: now, Deadline: now.Add(time.Hour), Launched: 1}
	h.writeRecords(
		store.Op{Kind: store.Instances, ID: lost.Key, Value: lost},
		store.Op{Kind: store.Instances, ID: ended.Key, Value: ended},
		store.Op{Kind: store.Batches, ID: done.Key, Value: done},
	)
	h.m.mu.Lock()
	gotLost, gotDone := *h.m.instances["h-lost"], *h.m.batches["b-done"]
	h.m.unlock()
	_, err := h.m.AuthenticateBatch("live-hash")
	live := err == nil
	if gotLost.State != Gone || gotLost.Reason != ReasonRepaired {
		t.Errorf("intent of a missing batch: %s (%s), want gone (repaired)", gotLost.State, gotLost.Reason)
	}
	if gotDone.TokenHash != "" || live {
		t.Errorf("batch with every slot gone: token hash %q, live %v; want dead", gotDone.TokenHash, live)
	}
	h.restart()
	h.settle()
	if n := h.cloud.Count("launch"); n != 0 {
		t.Errorf("%d launch calls after the repairs, want 0", n)
	}
	h.m.mu.Lock()
	defer h.m.unlock()
	if b := h.m.batches["b-done"]; b == nil || b.TokenHash != "" {
		t.Errorf("after a restart the repaired batch is %+v, want its token still dead", b)
	}
}

// A launched instance whose batch record a torn store lost lives on its
// own record: reconcile knows it by its id, not as an orphan of an
// unknown intent, and never ends it.
func TestLaunchedSlotOutlivesItsBatchRecord(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 2 })
	h.scaleTo(2)
	h.settle()
	ids := h.ids(Booting)
	if len(ids) != 2 {
		t.Fatalf("booting %v, want 2", ids)
	}
	var key string
	for k := range h.batches() {
		key = k
	}
	h.writeRecords(store.Op{Kind: store.Batches, ID: key})
	for range 3 {
		h.clock.Advance(10 * time.Minute) // past orphan_grace
		h.reconcile()
		h.settle()
	}
	if n := h.cloud.Count("terminate"); n != 0 {
		t.Errorf("%d terminate calls for instances the store knows, want none", n)
	}
	if got := h.ids(Booting); len(got) != 2 {
		t.Errorf("booting after reconciles %v, want %v", got, ids)
	}
}

// scaleTo sets the pool's min_idle (and so launches toward it).
func (h *harness) scaleTo(n int) {
	h.t.Helper()
	if _, err := h.m.Scale(context.Background(), "demo", &n, nil); err != nil {
		h.t.Fatal(err)
	}
}

// batches returns copies of the pool's batches, by key.
func (h *harness) batches() map[string]Batch {
	h.m.mu.Lock()
	defer h.m.unlock()
	out := map[string]Batch{}
	for k, b := range h.m.batches {
		out[k] = *b
	}
	return out
}

// The batch and every one of its slots are on disk before the cloud is
// asked, and the call is one, for all of them, with the batch's key as its
// client token and intent tag, and a user-data holding the batch's token.
func TestBatchIntentsBeforeCall(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5; s.MaxInstances = 10 })
	var checked []string
	var mu sync.Mutex
	h.cloud.SetBeforeLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		mu.Lock()
		defer mu.Unlock()
		batches, err := store.Load[*Batch](h.store, store.Batches)
		if err != nil {
			return err
		}
		insts, err := store.Load[*Instance](h.store, store.Instances)
		if err != nil {
			return err
		}
		b := batches[spec.ClientToken]
		if b == nil {
			checked = append(checked, "no batch on disk for client token "+spec.ClientToken)
			return nil
		}
		if spec.Tags[cloud.TagIntent] != b.Key {
			checked = append(checked, "intent tag "+spec.Tags[cloud.TagIntent])
		}
		if len(b.Slots) != 5 || b.Launched != -1 || b.TokenHash == "" {
			checked = append(checked, "batch on disk is not a launching batch of 5")
		}
		for i, k := range b.Slots {
			in := insts[k]
			if in == nil || in.Batch != b.Key || in.Slot != i || in.State != Launching || in.TokenHash != "" {
				checked = append(checked, "slot "+k+" not on disk as a launching slot without a token")
			}
		}
		tok := ""
		for line := range strings.Lines(string(spec.UserData)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "export HANGAR_BOOTSTRAP_TOKEN="); ok {
				tok = strings.Trim(v, "'")
			}
		}
		if bootstrap.HashToken(tok) != b.TokenHash {
			checked = append(checked, "the user-data's token is not the batch's")
		}
		if !strings.Contains(string(spec.UserData), "export HANGAR_ENROLL=") {
			checked = append(checked, "the user-data does not ask the instance to enroll")
		}
		checked = append(checked, "ok")
		return nil
	})
	h.scaleTo(5)
	h.settle()
	calls := h.cloud.Calls("launch")
	if len(calls) != 1 || calls[0].N != 5 {
		t.Fatalf("launch calls %+v, want one of 5", calls)
	}
	if !slices.Equal(checked, []string{"ok"}) {
		t.Fatalf("before the call: %v", checked)
	}
	if got := h.ids(Booting); len(got) != 5 {
		t.Fatalf("booting %v, want 5", got)
	}
	// The instances' user-data token is no bootstrap token: it only enrolls.
	for _, id := range h.ids(Booting) {
		if _, err := h.authenticate(id); !errors.Is(err, bootstrap.ErrUnauthorized) {
			t.Errorf("instance %s authenticating with the batch token: %v, want refused", id, err)
		}
	}
}

// max_instances 7 and batches of 5: the store never holds, and the cloud
// never runs, more than 7, and the calls ask for 5 then 2, even with more
// leases waiting than max_instances allows.
func TestBatchNeverExceedsMax(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5; s.MaxInstances = 7 })
	var mu sync.Mutex
	peakStore, peakCloud := 0, 0
	h.cloud.SetBeforeLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		insts, err := store.Load[*Instance](h.store, store.Instances)
		if err != nil {
			return err
		}
		live := 0
		for _, in := range insts {
			if in.State.live() {
				live++
			}
		}
		mu.Lock()
		peakStore = max(peakStore, live)
		mu.Unlock()
		return nil
	})
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		mu.Lock()
		peakCloud = max(peakCloud, len(h.cloud.Running()))
		mu.Unlock()
		return nil
	})
	h.scaleTo(7)
	h.settle()
	// Demand beyond max_instances launches nothing more.
	for range 12 {
		h.pendingLease(LeaseRequest{Wait: 10 * time.Minute})
	}
	h.settle()
	h.tick()
	var asked []int
	for _, c := range h.cloud.Calls("launch") {
		asked = append(asked, c.N)
	}
	slices.Sort(asked) // the two calls run at once
	if !slices.Equal(asked, []int{2, 5}) {
		t.Errorf("launch calls asked for %v, want 5 and 2", asked)
	}
	if peakStore > 7 || peakCloud > 7 || len(h.cloud.Running()) != 7 {
		t.Errorf("peaks: store %d, cloud %d; running %d; want at most 7, and 7", peakStore, peakCloud, len(h.cloud.Running()))
	}
}

// A partial batch (3 of 5 started, ErrCapacity for the rest) is no launch
// failure: the 2 slots without an instance go as launch_short, the pool is
// not backed off, and a batch of 2 is launched at once.
func TestBatchPartial(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5; s.MaxInstances = 10 })
	h.cloud.Short(3)
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		h.cloud.Short(0) // capacity comes back for the next call
		return nil
	})
	h.scaleTo(5)
	h.settle()
	var asked []int
	for _, c := range h.cloud.Calls("launch") {
		asked = append(asked, c.N)
	}
	if !slices.Equal(asked, []int{5, 2}) {
		t.Fatalf("launch calls asked for %v, want [5 2]", asked)
	}
	if p := h.pool(); p.RetryAt != nil || p.LaunchError != "" || p.LaunchBlocked {
		t.Errorf("pool after a partial batch: %+v; want no backoff and no launch error", p)
	}
	if got := h.ids(Booting); len(got) != 5 {
		t.Errorf("booting %v, want 5", got)
	}
	short := 0
	h.m.mu.Lock()
	for _, in := range h.m.instances {
		if in.State == Gone {
			if in.Reason != ReasonLaunchShort || in.ID != "" {
				t.Errorf("gone slot %s: reason %s, id %q; want launch_short without an id", in.Key, in.Reason, in.ID)
			}
			short++
		}
	}
	h.m.unlock()
	if short != 2 {
		t.Errorf("%d slots gone, want 2", short)
	}
	first := h.batches()[h.cloud.Calls("launch")[0].ClientToken]
	if first.Launched != 3 || first.Deadline.IsZero() {
		t.Errorf("first batch: launched %d, deadline %v; want 3 and a deadline", first.Launched, first.Deadline)
	}
}

// A crash cut the batch's call off after the cloud started its instances:
// the next start adopts each into the slot of its launch index, orphans
// none, and launches nothing more.
func TestBatchAdoptAfterCrash(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 3; s.MaxInstances = 3 })
	h.cloud.ReverseIndexes()
	entered := make(chan struct{})
	var once sync.Once
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		once.Do(func() { close(entered) })
		<-ctx.Done()
		return ctx.Err()
	})
	h.scaleTo(3)
	<-entered
	h.shutdown()
	h.cloud.SetAfterLaunch(nil)
	if n := len(h.cloud.Running()); n != 3 {
		t.Fatalf("cloud runs %d before the restart, want 3", n)
	}
	h.open()
	h.run()
	testutil.Eventually(t, "the batch's instances to be adopted", 10*time.Second, func() bool { return len(h.ids(Booting)) == 3 })
	h.stopRun()
	if n := h.cloud.Count("launch"); n != 1 {
		t.Errorf("launch calls = %d, want 1", n)
	}
	if n := h.cloud.Count("terminate"); n != 0 {
		t.Errorf("terminate calls = %d, want none", n)
	}
	key := h.cloud.Calls("launch")[0].ClientToken
	for _, id := range h.ids(Booting) {
		c, _ := h.cloud.Instance(id)
		in := h.instance(id)
		if in.Batch != key || in.Slot != c.LaunchIndex || in.Reason != ReasonAdopted {
			t.Errorf("instance %s (launch index %d): batch %s, slot %d, reason %s; want batch %s, slot %d, adopted", id, c.LaunchIndex, in.Batch, in.Slot, in.Reason, key, c.LaunchIndex)
		}
	}
	if b := h.batches()[key]; b.Launched != 3 || b.Deadline.IsZero() {
		t.Errorf("batch after adoption: launched %d, deadline %v", b.Launched, b.Deadline)
	}
}

// A crash before the call reached the cloud: the next start launches the
// batch again with the same key and the very same user-data (so a call
// that did land is answered, not repeated: EC2 refuses a client token
// replayed with other parameters), its token kept on disk until the
// cloud answers and not after.
func TestBatchResumedWithItsKey(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 3; s.MaxInstances = 3 })
	entered := make(chan struct{})
	var once sync.Once
	h.cloud.SetBeforeLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		once.Do(func() { close(entered) })
		<-ctx.Done()
		return ctx.Err()
	})
	h.scaleTo(3)
	<-entered
	h.shutdown()
	h.cloud.SetBeforeLaunch(nil)
	h.open()
	h.run()
	testutil.Eventually(t, "the batch to be launched", 10*time.Second, func() bool { return len(h.ids(Booting)) == 3 })
	h.stopRun()
	calls := h.cloud.Calls("launch")
	if len(calls) != 2 || calls[0].ClientToken != calls[1].ClientToken || calls[1].N != 3 {
		t.Fatalf("launch calls %+v, want two of 3 with one client token", calls)
	}
	if !bytes.Equal(calls[0].UserData, calls[1].UserData) {
		t.Errorf("the resumed call's user-data differs from the first's:\n%s\n---\n%s", calls[0].UserData, calls[1].UserData)
	}
	if b := h.batches()[calls[0].ClientToken]; len(b.EarlierTokenHashes) != 0 || b.TokenHash == "" || b.Token != "" {
		t.Errorf("resumed batch: token hash %q, earlier %v, token kept %v; want the one token, live, off the disk once answered", b.TokenHash, b.EarlierTokenHashes, b.Token != "")
	}
}

// A batch whose call never answered and whose slots all drained before a
// crash has nothing left to launch: at the next start its token dies,
// rather than open the script route for ever.
func TestUnansweredDrainedBatchTokenDies(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 3; s.MaxInstances = 3 })
	entered := make(chan struct{})
	var once sync.Once
	h.cloud.SetBeforeLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		once.Do(func() { close(entered) })
		<-ctx.Done()
		return ctx.Err()
	})
	h.scaleTo(3)
	<-entered
	var key, hash string
	for k, b := range h.batches() {
		key, hash = k, b.TokenHash
	}
	if _, err := h.m.AuthenticateBatch(hash); err != nil {
		t.Fatalf("the batch token while its call is under way: %v", err)
	}
	// Drained while launching, then a crash.
	h.scaleTo(0)
	h.m.mu.Lock()
	for _, k := range h.m.batches[key].Slots {
		if in := h.m.instances[k]; in != nil && in.State == Launching {
			h.m.terminateLocked(in, ReasonScaleIn)
		}
	}
	h.m.unlock()
	h.shutdown()
	h.cloud.SetBeforeLaunch(nil)
	h.open()
	h.run()
	testutil.Eventually(t, "the batch's token to die", 10*time.Second, func() bool {
		_, err := h.m.AuthenticateBatch(hash)
		return errors.Is(err, bootstrap.ErrUnauthorized)
	})
	h.stopRun()
	if b, ok := h.batches()[key]; ok && (b.TokenHash != "" || b.Token != "") {
		t.Errorf("batch %+v keeps a token", b)
	}
}

// launch_batch = 1 (or unset) is today's launch: one call per instance,
// each with the instance's key as its client token and its own token in
// its user-data, and no batch.
func TestLaunchBatchOneIsToday(t *testing.T) {
	for _, batch := range []int{0, 1} {
		h := newHarness(t, func(s *Spec) { s.LaunchBatch = batch; s.MaxInstances = 3 })
		ids := h.warm(3) // each authenticates with its own user-data token
		calls := h.cloud.Calls("launch")
		if len(calls) != 3 {
			t.Fatalf("launch_batch %d: %d launch calls, want 3", batch, len(calls))
		}
		for _, id := range ids {
			in := h.instance(id)
			c, _ := h.cloud.Instance(id)
			if in.Batch != "" || c.ClientToken != in.Key || c.Tags[cloud.TagIntent] != in.Key {
				t.Errorf("launch_batch %d: instance %s in batch %q, client token %s, intent %s; want none, and its key %s", batch, id, in.Batch, c.ClientToken, c.Tags[cloud.TagIntent], in.Key)
			}
		}
		for _, c := range calls {
			if c.N != 1 {
				t.Errorf("launch_batch %d: a call asked for %d", batch, c.N)
			}
		}
		if b := h.batches(); len(b) != 0 {
			t.Errorf("launch_batch %d: batches %v, want none", batch, b)
		}
	}
}

// Dispatch bounds a batched pool's launch calls under way, not its
// launching instances: 10 calls of 5 at once for a scale-out to 100.
func TestBatchCallsBounded(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5; s.MaxInstances = 100 })
	var mu sync.Mutex
	inFlight, peak := 0, 0
	release := make(chan struct{})
	h.cloud.SetBeforeLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		mu.Lock()
		inFlight++
		peak = max(peak, inFlight)
		mu.Unlock()
		<-release
		mu.Lock()
		inFlight--
		mu.Unlock()
		return nil
	})
	h.scaleTo(100)
	testutil.Eventually(t, "the first calls to be under way", 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return inFlight == maxLaunchCalls
	})
	h.m.mu.Lock()
	launching := h.m.pools["demo"].count[Launching]
	h.m.unlock()
	if launching != 5*maxLaunchCalls {
		t.Errorf("%d instances launching with %d calls under way, want %d", launching, maxLaunchCalls, 5*maxLaunchCalls)
	}
	close(release)
	h.settle()
	if got := len(h.cloud.Running()); got != 100 {
		t.Errorf("%d instances launched, want 100", got)
	}
	if n := h.cloud.Count("launch"); n != 20 || peak > maxLaunchCalls {
		t.Errorf("%d launch calls, %d at once; want 20, at most %d", n, peak, maxLaunchCalls)
	}
}

// pacedCloud is the fake cloud with a launch headroom, as EC2's instance
// bucket gives one.
type pacedCloud struct {
	*fakeCloud
	headroom int
}

func (p pacedCloud) LaunchHeadroom() int { return p.headroom }

// wrapped is a provider wrapper, as the metrics wrapper is one.
type wrapped struct{ cloud.Provider }

func (w wrapped) Unwrap() cloud.Provider { return w.Provider }

// A batch is no larger than the provider says it can start now (seen
// through a wrapper), and at least one instance.
func TestBatchShrinksToHeadroom(t *testing.T) {
	for _, tc := range []struct {
		headroom int
		want     []int
	}{{3, []int{2, 3}}, {0, []int{1, 1, 1, 1, 1}}, {100, []int{5}}} {
		h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5; s.MaxInstances = 5 })
		h.provider = wrapped{pacedCloud{h.cloud, tc.headroom}}
		h.restart()
		h.scaleTo(5)
		h.settle()
		var asked []int
		for _, c := range h.cloud.Calls("launch") {
			asked = append(asked, c.N)
		}
		slices.Sort(asked)
		if !slices.Equal(asked, tc.want) {
			t.Errorf("headroom %d: launch calls asked for %v, want %v", tc.headroom, asked, tc.want)
		}
	}
}

// `hangar userdata render` shows what the pool's instances boot with: a
// batch's user-data, which enrolls, when the pool launches batches.
func TestRenderUserDataOfBatches(t *testing.T) {
	for _, tc := range []struct {
		batch  int
		enroll bool
	}{{0, false}, {1, false}, {50, true}} {
		s := testOptions(func(s *Spec) { s.LaunchBatch = tc.batch }).Pools["demo"]
		ud, err := RenderUserData(s, "demo", "http://127.0.0.1:7878")
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(string(ud), "export HANGAR_ENROLL=1"); got != tc.enroll {
			t.Errorf("launch_batch %d: enrolls %v, want %v", tc.batch, got, tc.enroll)
		}
	}
}

// A crash cut the batch's call off after the cloud started both of its
// instances, and the listing at the restart shows only one: reconcile
// adopts that one, the resumed call (same key) is answered with both, the
// other takes the free slot, and both enroll with the token their
// user-data holds, the first call's.
func TestBatchPartlyAdoptedThenResumed(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 2 })
	entered := make(chan struct{})
	var once sync.Once
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		once.Do(func() { close(entered) })
		<-ctx.Done()
		return ctx.Err()
	})
	h.scaleTo(2)
	<-entered
	h.shutdown()
	h.cloud.SetAfterLaunch(nil)
	ids := h.cloud.Running()
	if len(ids) != 2 {
		t.Fatalf("cloud runs %v before the restart, want 2", ids)
	}
	h.cloud.Hide(ids[1], true)
	h.open()
	h.run()
	testutil.Eventually(t, "both instances to be booting", 10*time.Second, func() bool { return len(h.ids(Booting)) == 2 })
	h.stopRun()
	h.cloud.Hide(ids[1], false)
	calls := h.cloud.Calls("launch")
	if len(calls) != 2 || calls[0].ClientToken != calls[1].ClientToken {
		t.Fatalf("launch calls %+v, want the batch's call and its resumption, with one key", calls)
	}
	if got := h.instance(ids[0]).Reason; got != ReasonAdopted {
		t.Errorf("listed instance %s: reason %s, want adopted", ids[0], got)
	}
	if n := h.cloud.Count("terminate"); n != 0 {
		t.Errorf("%d terminate calls, want none", n)
	}
	for _, id := range ids {
		h.enrolledReady(id)
	}
	if got := h.ids(Idle); !slices.Equal(got, ids) {
		t.Errorf("idle %v, want %v", got, ids)
	}
}
