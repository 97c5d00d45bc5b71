package pool

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/pool/store"
)

// Batch is the intent of one launch call that starts several instances
// (Spec.LaunchBatch). Its slots are instance records, Launching until the
// call answers, written with the batch in one transaction before the call.
// Every instance of the batch boots with the same user-data, which holds
// the batch's enrollment token: at boot an instance presents it with its
// instance id, and gets its own bootstrap token (channel.go's Enroll).
type Batch struct {
	// Key is the launch's client token and its hangar:intent tag.
	Key   string `json:"key"`
	Pool  string `json:"pool"`
	Image string `json:"image,omitempty"` // what the call launches: a retry must send the same
	// Slots are the keys of its instances; a slot's index is the launch
	// index the cloud is expected to give its instance.
	Slots []string `json:"slots"`
	// TokenHash is the hash of the enrollment token; "" once the token is
	// dead (every slot enrolled or gone, or the deadline passed).
	TokenHash string `json:"token_hash,omitempty"`
	// EarlierTokenHashes are those of tokens of calls a restart cut off:
	// such a call may have reached the cloud, whose instances then boot
	// with the earlier token (as Instance.EarlierTokenHashes).
	EarlierTokenHashes []string  `json:"earlier_token_hashes,omitempty"`
	IntentAt           time.Time `json:"intent_at"`
	// Deadline is when the token dies whatever is left to enroll: the
	// launch's answer plus boot_timeout. Zero until the launch answered.
	Deadline time.Time `json:"deadline,omitzero"`
	// Launched is how many instances the cloud started for it; -1 until
	// the call answered (or reconcile adopted its instances).
	Launched int `json:"launched"`
	// Token is the enrollment token itself, kept only until the cloud has
	// answered: a retry after a crash must send the very user-data of the
	// first call, or EC2 refuses the replayed client token
	// (IdempotentParameterMismatch) and the batch's instances may launch
	// twice. Like an instance's password, it is on Hangar's disk alone.
	Token string `json:"token,omitempty"`

	inFlight bool // its launch call is under way (or about to be)
	// deadHashes are the hashes its token had before it died: still in
	// m.byBatchToken, so that a refusal names the batch, until the batch
	// is forgotten.
	deadHashes []string
}

// live reports whether b's enrollment token still enrolls at now.
func (b *Batch) live(now time.Time) bool {
	return b.TokenHash != "" && (b.Deadline.IsZero() || !now.After(b.Deadline))
}

// answered reports whether the cloud has named b's instances.
func (b *Batch) answered() bool { return b.Launched >= 0 }

func (m *Manager) saveBatch(b *Batch) {
	m.write(store.Op{Kind: store.Batches, ID: b.Key, Value: b})
}

// indexBatch makes b known, and its token valid while it lives.
func (m *Manager) indexBatch(b *Batch) {
	m.batches[b.Key] = b
	if b.TokenHash != "" {
		m.byBatchToken[b.TokenHash] = b
		for _, h := range b.EarlierTokenHashes {
			m.byBatchToken[h] = b
		}
	}
}

// killBatchToken ends b's enrollment token (every hash it had): no
// instance enrolls with it from now on (Batch.live). Caller holds m.mu.
func (m *Manager) killBatchToken(b *Batch, why string) {
	if b.TokenHash == "" {
		return
	}
	b.deadHashes = append(append(b.deadHashes, b.TokenHash), b.EarlierTokenHashes...)
	b.TokenHash, b.EarlierTokenHashes, b.Token = "", nil, ""
	m.saveBatch(b)
	m.log.Info("batch enrollment token dead", "pool", b.Pool, "batch", b.Key, "why", why)
}

// slot returns the instance of b's slot i, nil if there is none.
func (m *Manager) slot(b *Batch, i int) *Instance {
	if i < 0 || i >= len(b.Slots) {
		return nil
	}
	in := m.instances[b.Slots[i]]
	if in == nil || in.Batch != b.Key {
		return nil
	}
	return in
}

// slotDone reports whether in has nothing left to enroll: it enrolled, or
// it is gone (or its record is).
func slotDone(in *Instance) bool {
	return in == nil || !in.EnrolledAt.IsZero() || in.State == Gone || in.State == Terminating
}

// batchDone reports whether every slot of b has enrolled or gone, once the
// cloud has answered: its token has nothing left to do.
func (m *Manager) batchDone(b *Batch) bool {
	if !b.answered() || b.inFlight {
		return false
	}
	for i := range b.Slots {
		if !slotDone(m.slot(b, i)) {
			return false
		}
	}
	return true
}

// repairBatchesLocked checks the batch invariants over the restored
// records and mends what breaks them, as repairLocked does for leases:
//   - a slot names a batch that exists and lists it at its Slot;
//   - a batch's slots exist and name it;
//   - a batch whose call never answered has no deadline, and a live token
//     only while it may still enroll someone.
//
// Caller holds m.mu (or owns m alone, as New does).
func (m *Manager) repairBatchesLocked() {
	for _, in := range sortedInstances(m.instances) {
		if in.Batch == "" {
			continue
		}
		b := m.batches[in.Batch]
		if b != nil && in.Slot >= 0 && in.Slot < len(b.Slots) && b.Slots[in.Slot] == in.Key {
			continue
		}
		if in.State != Launching {
			// Launched and named already: it lives on its own record
			// (its batch only mattered for enrollment).
			continue
		}
		// An intent no batch launches: nothing may launch it, and
		// nothing does (reconcile ends any instance tagged with its
		// batch's key that no slot takes).
		m.repaired("batch_slot_orphaned", "launch intent names no batch that holds it; dropped", nil, in)
		m.setState(in, Gone, ReasonRepaired)
	}
	for _, key := range slices.Sorted(maps.Keys(m.batches)) {
		b := m.batches[key]
		for i, k := range b.Slots {
			if in := m.instances[k]; in == nil || in.Batch != b.Key || in.Slot != i {
				if in == nil && b.answered() {
					continue // forgotten after it was gone, as every gone record is
				}
				m.log.Warn("store repair: batch slot has no instance that names it; counted as gone", "kind", "batch_slot_missing", "batch", b.Key, "slot", i)
				if m.metrics != nil {
					m.metrics.StoreRepairs.WithLabelValues("batch_slot_missing").Inc()
				}
			}
		}
		if b.TokenHash != "" && m.batchDone(b) {
			m.killBatchToken(b, "every slot enrolled or gone")
		}
	}
}

// launchPacer is implemented by providers that know how many instances the
// cloud will start soon without throttling (EC2's instance bucket): a
// batch is no larger, so that it does not wait out its call timeout in
// the provider's rate limiter.
type launchPacer interface {
	LaunchHeadroom() int
}

// batchSize is how many instances p's next launch call starts, for need
// more of them and room for more within max_instances.
func batchSize(p *poolState, need, room int) int {
	k := min(need, p.spec.launchBatch(), room)
	if lp, ok := cloud.As[launchPacer](p.provider); ok {
		k = min(k, max(1, lp.LaunchHeadroom()))
	}
	return k
}

// launchBatchLocked writes the intent of a batch of k instances for p, the
// batch and its k slots in the decision under way (so in one transaction),
// and launches them in the background in one call. As with launchLocked,
// the intent is on disk before the cloud is asked, and the batch's key is
// the call's idempotency token and every instance's intent tag, so a crash
// at any point neither leaks an instance nor launches one twice.
func (m *Manager) launchBatchLocked(p *poolState, k int) {
	now := m.clock.Now()
	token := randomToken(32)
	b := &Batch{
		Key:       "b-" + m.newID(12),
		Pool:      p.name,
		Image:     p.launchImage(),
		TokenHash: bootstrap.HashToken(token),
		IntentAt:  now,
		Launched:  -1,
		Token:     token,
		inFlight:  true,
	}
	for i := range k {
		in := &Instance{
			Key:       "h-" + m.newID(12),
			Pool:      p.name,
			State:     Launching,
			Since:     now,
			IntentAt:  now,
			Password:  randomToken(24), // its own, as every instance's
			LastSeen:  now,
			Image:     b.Image,
			Batch:     b.Key,
			Slot:      i,
			accounted: now,
			op:        OpLaunch,
		}
		b.Slots = append(b.Slots, in.Key)
		m.index(in)
		m.saveInstance(in)
	}
	m.indexBatch(b)
	m.saveBatch(b)
	p.launchCalls++
	m.notify()
	m.goAsync(func(ctx context.Context) {
		m.mu.Lock()
		intent := m.synced()
		m.unlock()
		if err := intent.Wait(); err != nil {
			m.mu.Lock()
			m.endBatchCallLocked(p, b)
			m.batchFailedLocked(p, b, fmt.Errorf("writing launch intent: %w", err))
			m.unlock()
			return
		}
		m.launchBatch(ctx, p, b)
	})
}

// endBatchCallLocked records that b's launch call is over.
func (m *Manager) endBatchCallLocked(p *poolState, b *Batch) {
	if b.inFlight {
		b.inFlight = false
		p.launchCalls--
	}
	for i := range b.Slots {
		if in := m.slot(b, i); in != nil && in.op == OpLaunch {
			in.op = OpNone
		}
	}
}

// launchBatch makes b's launch call and gives its slots the instances the
// cloud started.
func (m *Manager) launchBatch(ctx context.Context, p *poolState, b *Batch) {
	m.mu.Lock()
	launching := false
	for i := range b.Slots {
		if in := m.slot(b, i); in != nil && in.State == Launching {
			launching = true
		}
	}
	if !launching {
		// Every slot drained before the call began: no call at all.
		// (Those reconcile adopted meanwhile still enroll: the token
		// dies only with nothing left to enroll.)
		m.endBatchCallLocked(p, b)
		m.dropUnlaunchedSlotsLocked(b, ReasonNone)
		m.answeredLocked(p, b, m.placedLocked(b))
		m.unlock()
		return
	}
	token := b.Token
	var renewed *store.Commit
	if token == "" {
		// A record that kept only the token's hash (its token died, or an
		// older version wrote it): the retry gets a new token, on disk
		// before the call, and the earlier one still enrolls in case the
		// first call did happen.
		token = randomToken(32)
		if b.TokenHash != "" {
			b.EarlierTokenHashes = append(b.EarlierTokenHashes, b.TokenHash)
		}
		b.TokenHash, b.Token = bootstrap.HashToken(token), token
		m.byBatchToken[b.TokenHash] = b
		m.saveBatch(b)
		renewed = m.synced()
	}
	n := len(b.Slots) // always all of them: a retry must ask what the first try asked
	spec := p.spec
	launch := spec.Launch
	launch.Image = cmp.Or(b.Image, p.launchImage())
	launch.Tags = m.intentTags(p, b.Key)
	launch.ClientToken = b.Key
	m.unlock()

	var err error
	if renewed != nil {
		err = renewed.Wait()
	}
	var ud []byte
	if err == nil {
		ud, err = spec.batchUserData(p.name, m.opts.PublicURL, token)
	}
	var got []cloud.Instance
	if err == nil {
		launch.UserData = ud
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		got, err = p.provider.Launch(cctx, launch, n)
		cancel()
	}
	m.mu.Lock()
	defer m.unlock()
	m.endBatchCallLocked(p, b)
	if len(got) == 0 {
		if err == nil {
			err = errors.New("cloud launched nothing")
		}
		if ctx.Err() != nil {
			return // shutting down: the batch is resumed at the next start
		}
		m.batchFailedLocked(p, b, err)
		return
	}
	// Started some: not a failure, whatever the error says of the rest
	// (a partial batch: EC2 starts fewer than asked when short of
	// capacity). The rest are launched by the next dispatch, at once.
	p.launchFailures, p.launchErr, p.blocked = 0, "", false
	placed := m.placeLocked(p, b, got)
	if short := m.dropUnlaunchedSlotsLocked(b, ReasonLaunchShort); short > 0 {
		m.log.Warn("batch launched short", "pool", p.name, "batch", b.Key, "asked", n, "started", placed, "err", err)
	}
	m.answeredLocked(p, b, placed)
	m.dispatchLocked()
}

// answeredLocked records that the cloud named placed instances of b: from
// now, the batch's token lives until boot_timeout at most.
func (m *Manager) answeredLocked(p *poolState, b *Batch, placed int) {
	b.Launched, b.Token = placed, ""
	if b.Deadline.IsZero() {
		// Not again at a retry's answer: boot_timeout counts from the
		// first answer (or adoption).
		b.Deadline = m.clock.Now().Add(p.spec.BootTimeout)
	}
	m.saveBatch(b)
	if m.batchDone(b) {
		m.killBatchToken(b, "every slot enrolled or gone")
	}
}

// placeLocked gives each instance the cloud started for b a slot: the
// slot of its launch index when the indexes are distinct and in range,
// else the first free one (before enrollment slots differ in nothing but
// their keys). It returns how many of b's slots have an instance.
func (m *Manager) placeLocked(p *poolState, b *Batch, got []cloud.Instance) int {
	byIndex := true
	seen := map[int]bool{}
	for _, c := range got {
		if c.LaunchIndex < 0 || c.LaunchIndex >= len(b.Slots) || seen[c.LaunchIndex] {
			byIndex = false
		}
		seen[c.LaunchIndex] = true
	}
	for _, c := range got {
		if in := m.byID[c.ID]; in != nil {
			continue // adopted by reconcile before this answer (a resumed batch)
		}
		var in *Instance
		if byIndex {
			in = m.slot(b, c.LaunchIndex)
			if !freeSlot(in) {
				in = nil
			}
		}
		if in == nil {
			in = m.freeSlotLocked(b)
		}
		if in == nil {
			// More than asked: the cloud broke its promise. End it.
			m.log.Warn("cloud started more instances than the batch asked; terminating the extra", "pool", p.name, "batch", b.Key, "instance", c.ID)
			m.terminateIDs(p.provider, p.name, []string{c.ID}, ReasonOrphan)
			continue
		}
		m.launchedLocked(in, c)
	}
	return m.placedLocked(b)
}

// placedLocked is how many of b's slots have an instance.
func (m *Manager) placedLocked(b *Batch) int {
	placed := 0
	for i := range b.Slots {
		if in := m.slot(b, i); in != nil && in.ID != "" {
			placed++
		}
	}
	return placed
}

// freeSlot reports whether in is a slot that may take an instance: one
// without an id, still launching or drained while launching.
func freeSlot(in *Instance) bool {
	return in != nil && in.ID == "" && (in.State == Launching || in.State == Terminating)
}

func (m *Manager) freeSlotLocked(b *Batch) *Instance {
	for i := range b.Slots {
		if in := m.slot(b, i); freeSlot(in) {
			return in
		}
	}
	return nil
}

// dropUnlaunchedSlotsLocked ends b's slots that have no instance and
// returns how many it ended.
func (m *Manager) dropUnlaunchedSlotsLocked(b *Batch, reason Reason) int {
	n := 0
	for i := range b.Slots {
		if in := m.slot(b, i); freeSlot(in) {
			in.op = OpNone
			m.setState(in, Gone, reason)
			n++
		}
	}
	return n
}

// batchFailedLocked is a batch whose call started nothing: one launch
// failure for the pool, whatever the batch's size, and every slot without
// an instance gone.
func (m *Manager) batchFailedLocked(p *poolState, b *Batch, err error) {
	m.launchBackoffLocked(p, b.Key, err)
	m.dropUnlaunchedSlotsLocked(b, ReasonLaunchFailed)
	// Those reconcile adopted before a retry failed are the batch's.
	m.answeredLocked(p, b, m.placedLocked(b))
}

// resumeBatchesLocked restarts the launch calls of batches a crash cut
// off, with their keys, so the cloud answers with what the first call
// started, if it started anything. Caller holds m.mu.
func (m *Manager) resumeBatchesLocked() {
	for _, key := range slices.Sorted(maps.Keys(m.batches)) {
		b := m.batches[key]
		p := m.pools[b.Pool]
		// An answered batch too: reconcile may have adopted some of its
		// instances and not (yet) the others.
		if b.inFlight {
			continue
		}
		var slots []*Instance
		for i := range b.Slots {
			if in := m.slot(b, i); in != nil && in.State == Launching && in.op == OpNone {
				slots = append(slots, in)
			}
		}
		switch {
		case len(slots) > 0 && p != nil:
		case b.answered():
			continue
		default:
			// Nothing left to launch of a call that never answered (its
			// slots drained, or its pool removed): it is answered with
			// what it has, so its token dies with the rest, not never.
			b.Launched, b.Token = m.placedLocked(b), ""
			m.saveBatch(b)
			if p != nil && !m.batchDone(b) {
				m.answeredLocked(p, b, b.Launched)
			} else {
				m.killBatchToken(b, "nothing left to launch")
			}
			continue
		}
		for _, in := range slots {
			in.op = OpLaunch
		}
		b.inFlight = true
		p.launchCalls++
		m.goAsync(func(ctx context.Context) { m.launchBatch(ctx, p, b) })
	}
}

// batchOfLocked finds the record of a listed instance tagged with a
// batch's key: its slot if it has one, else a free slot to adopt it into
// (one launched before a crash cut the call's answer off). wait means the
// batch's call is under way and its answer will place the instance.
func (m *Manager) batchOfLocked(c cloud.Instance) (in *Instance, b *Batch, wait bool) {
	b = m.batches[c.Tags[cloud.TagIntent]]
	if b == nil {
		return nil, nil, false
	}
	if in := m.byID[c.ID]; in != nil && in.Batch == b.Key {
		return in, b, false
	}
	if b.inFlight {
		return nil, b, true
	}
	in = m.slot(b, c.LaunchIndex)
	if !freeSlot(in) {
		in = m.freeSlotLocked(b)
	}
	return in, b, false
}

// batchTimersLocked kills the tokens of batches past their deadline or with
// nothing left to enroll, and forgets dead batches whose slots are all
// forgotten.
func (m *Manager) batchTimersLocked(now time.Time) {
	var due []*Batch
	for _, b := range m.batches {
		if b.answered() && !b.inFlight {
			due = append(due, b)
		}
	}
	slices.SortFunc(due, func(a, b *Batch) int { return strings.Compare(a.Key, b.Key) })
	for _, b := range due {
		switch {
		case b.TokenHash != "" && now.After(b.Deadline):
			m.killBatchToken(b, "boot_timeout")
		case b.TokenHash != "" && m.batchDone(b):
			m.killBatchToken(b, "every slot enrolled or gone")
		case b.TokenHash == "":
			remaining := false
			for _, k := range b.Slots {
				if m.instances[k] != nil {
					remaining = true
					break
				}
			}
			if !remaining {
				for _, h := range b.deadHashes {
					delete(m.byBatchToken, h)
				}
				delete(m.batches, b.Key)
				m.write(store.Op{Kind: store.Batches, ID: b.Key})
			}
		}
	}
}

// adoptedLocked records that reconcile gave one of b's slots an instance
// its call's lost answer would have named: the cloud answered, in effect.
func (m *Manager) adoptedLocked(b *Batch) {
	b.Launched = m.placedLocked(b)
	if b.Deadline.IsZero() {
		if p := m.pools[b.Pool]; p != nil {
			b.Deadline = m.clock.Now().Add(p.spec.BootTimeout)
		}
	}
	m.saveBatch(b)
}
