package pool

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
)

var _ bootstrap.Backend = (*Manager)(nil)

// Authenticate implements bootstrap.Backend.
func (m *Manager) Authenticate(tokenHash string) (string, error) {
	m.mu.Lock()
	in, ok := m.byToken[tokenHash]
	if !ok {
		// A bootstrap refused stops for good: the revocation it learns of
		// must be on disk, not undone by a crash.
		saved := m.synced()
		m.unlock()
		saved.Wait() //nolint:errcheck // refused either way; a failed write is reported to whoever made it
		return "", bootstrap.ErrUnauthorized
	}
	if in.Batch != "" && !in.TokenUsed && tokenHash == in.TokenHash {
		// Its enrollment's answer arrived: it can no longer be issued
		// again (enrollLocked).
		in.TokenUsed = true
		m.saveInstance(in)
	}
	if tokenHash == in.NextTokenHash {
		// The instance has the token it was sent: the old one dies.
		m.revokeTokens(in)
		in.TokenHash, in.NextTokenHash, in.EarlierTokenHashes = tokenHash, "", nil
		m.byToken[in.TokenHash] = in
		m.saveInstance(in)
		m.log.Info("bootstrap token rotated", "pool", in.Pool, "instance", in.name())
	}
	m.unlock()
	return in.Key, nil
}

// AuthenticateBatch implements bootstrap.Backend: a live batch token opens
// the script and enroll routes, nothing else.
func (m *Manager) AuthenticateBatch(tokenHash string) (string, error) {
	m.mu.Lock()
	defer m.unlock()
	b, ok := m.byBatchToken[tokenHash]
	if !ok || !b.live(m.clock.Now()) {
		return "", bootstrap.ErrUnauthorized
	}
	return b.Pool, nil
}

// Reasons an enrollment is refused: in the log and the metric, never in
// the answer.
const (
	enrollDeadToken = "dead_token"  // unknown, dead, or past the batch's deadline
	enrollOther     = "other_batch" // the id is an instance of another batch, or of none
	enrollUnknown   = "unknown_id"  // the id is no instance of the batch, which has all of its
	enrollReused    = "reused_id"   // the instance enrolled before, with another key or a used token
	enrollEnded     = "ended"       // the instance is ending or gone
	enrollNoKey     = "no_enroll_key"
	enrollIdentity  = "bad_identity" // signed identity: no document, a bad signature, or not this instance's
)

// identitySkew is how much earlier than its batch's intent an instance's
// identity document may say it started: clocks differ. Much earlier means
// another machine's document.
const identitySkew = 5 * time.Minute

// Enroll implements bootstrap.Backend: an instance of a batch presents the
// batch token and its instance id, and gets its own bootstrap token, once.
// The token is on disk (its hash, with the enrollment) before it is
// answered: an instance told a token that a crash forgot could never
// bootstrap, and could not enroll again either.
func (m *Manager) Enroll(ctx context.Context, batchTokenHash string, e bootstrap.Enrollment) (string, error) {
	// A signature is checked before the lock: it costs an RSA verify.
	m.mu.Lock()
	var check *IdentityCheck
	var intentAt time.Time
	if b := m.byBatchToken[batchTokenHash]; b != nil {
		if p := m.pools[b.Pool]; p != nil && p.spec.Identity == "signed" {
			check, intentAt = p.spec.SignedIdentity, b.IntentAt
		}
	}
	m.unlock()
	idErr := errors.New("identity not checked")
	if check != nil {
		idErr = checkIdentity(check, e, intentAt)
	}

	m.mu.Lock()
	token, b, reason, err := m.enrollLocked(batchTokenHash, e, idErr)
	pool, batch := "", ""
	if b != nil {
		pool, batch = b.Pool, b.Key
	}
	result := "ok"
	switch {
	case reason != "":
		result = reason
		args := []any{"pool", pool, "batch", batch, "instance", e.InstanceID, "reason", reason, "remote", e.RemoteAddr}
		if reason == enrollIdentity {
			args = append(args, "err", idErr)
		}
		m.log.Warn("enrollment refused", args...)
	case errors.Is(err, bootstrap.ErrEnrollPending):
		result = "pending"
	}
	m.enrolled(pool, result)
	saved := m.synced()
	m.unlock()
	if err != nil {
		return "", err
	}
	if err := saved.Wait(); err != nil {
		return "", fmt.Errorf("saving the enrollment of %s: %w", e.InstanceID, err)
	}
	return token, nil
}

// enrolled counts an enrollment's outcome.
func (m *Manager) enrolled(pool, result string) {
	if m.metrics != nil && m.metrics.Enrollments != nil {
		m.metrics.Enrollments.WithLabelValues(pool, result).Inc()
	}
}

// enrollLocked decides an enrollment: a token, or why not (reason, with
// ErrUnauthorized), or ErrEnrollPending. idErr is what the identity check
// found, nil if the document was checked and good. Caller holds m.mu.
func (m *Manager) enrollLocked(hash string, e bootstrap.Enrollment, idErr error) (token string, b *Batch, reason string, err error) {
	now := m.clock.Now()
	refuse := func(why string) (string, *Batch, string, error) {
		return "", b, why, bootstrap.ErrUnauthorized
	}
	b = m.byBatchToken[hash]
	if b == nil || !b.live(now) {
		return refuse(enrollDeadToken)
	}
	if e.EnrollKey == "" {
		return refuse(enrollNoKey)
	}
	p := m.pools[b.Pool]
	if p == nil {
		return refuse(enrollDeadToken) // a batch of a pool no longer configured
	}
	if p.spec.Identity == "signed" && idErr != nil {
		return refuse(enrollIdentity)
	}
	in := m.byID[e.InstanceID]
	switch {
	case in != nil && in.Batch != b.Key:
		return refuse(enrollOther)
	case in == nil && (b.inFlight || m.freeSlotLocked(b) != nil):
		// The launch has not named all of its instances yet (its call
		// is under way, or a restart cut it off): this may be one.
		return "", b, "", bootstrap.ErrEnrollPending
	case in == nil:
		return refuse(enrollUnknown)
	case in.State == Terminating || in.State == Gone:
		return refuse(enrollEnded)
	}
	keyHash := bootstrap.HashToken(e.EnrollKey)
	if !in.EnrolledAt.IsZero() {
		if in.EnrollKeyHash != keyHash || in.TokenUsed {
			return refuse(enrollReused)
		}
		// The same instance again, before it used what it was told:
		// the answer was lost. The earlier token dies.
		m.log.Info("enrollment answered again", "pool", in.Pool, "batch", b.Key, "instance", in.ID)
		m.revokeTokens(in)
	}
	token = randomToken(32)
	in.TokenHash = bootstrap.HashToken(token)
	in.EarlierTokenHashes, in.NextTokenHash = nil, ""
	in.EnrolledAt, in.EnrollKeyHash = now, keyHash
	in.LastSeen = now
	m.byToken[in.TokenHash] = in
	m.saveInstance(in)
	if m.batchDone(b) {
		m.killBatchToken(b, "every slot enrolled or gone")
	}
	return token, b, "", nil
}

func (m *Manager) instanceLocked(key string) (*Instance, error) {
	in, ok := m.instances[key]
	if !ok || m.byToken[in.TokenHash] != in {
		return nil, bootstrap.ErrUnauthorized
	}
	return in, nil
}

// Script implements bootstrap.Backend.
func (m *Manager) Script(ctx context.Context, key string) ([]byte, error) {
	m.mu.Lock()
	in, err := m.instanceLocked(key)
	var src string
	if err == nil {
		if p := m.pools[in.Pool]; p != nil {
			src = p.spec.Bootstrap
		} else {
			err = fmt.Errorf("%w %q", ErrUnknownPool, in.Pool)
		}
	}
	m.unlock()
	if err != nil {
		return nil, err
	}
	return m.scripts.Load(ctx, src)
}

var _ bootstrap.PoolScripter = (*Manager)(nil)

// PoolScript implements bootstrap.PoolScripter: the bootstrap script of a
// pool, for an instance of a batch that fetches it with the batch token
// (AuthenticateBatch) before it enrolls.
func (m *Manager) PoolScript(ctx context.Context, pool string) ([]byte, error) {
	p := m.pools[pool] // fixed in New: no lock needed
	if p == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownPool, pool)
	}
	return m.scripts.Load(ctx, p.spec.Bootstrap)
}

// Ready implements bootstrap.Backend: the instance's bootstrap runs.
func (m *Manager) Ready(ctx context.Context, key string, r bootstrap.Ready) error {
	m.mu.Lock()
	err := m.readyLocked(key, r)
	saved := m.synced()
	m.unlock()
	if err != nil {
		return err
	}
	// Answered once on disk: a bootstrap told "ready" never says it again,
	// so a ready lost to a crash would leave its instance booting until
	// boot_timeout.
	if err := saved.Wait(); err != nil {
		return fmt.Errorf("saving the ready report of %s: %w", key, err)
	}
	return nil
}

func (m *Manager) readyLocked(key string, r bootstrap.Ready) error {
	in, err := m.instanceLocked(key)
	if err != nil {
		return err
	}
	now := m.clock.Now()
	in.LastSeen = now
	if r.SSHHostKey != "" {
		if in.SSHHostKey != "" && in.SSHHostKey != r.SSHHostKey {
			// Pinned at first report; a change means something else holds
			// the token now.
			m.log.Warn("instance reported a different ssh host key; refused", "pool", in.Pool, "instance", in.ID)
			return fmt.Errorf("ssh host key of %s changed: %w", in.name(), bootstrap.ErrUnauthorized)
		}
		in.SSHHostKey = r.SSHHostKey
	}
	switch in.State {
	case Launching:
		in.ReadyAt = now
		m.saveInstance(in)
	case Booting:
		in.ReadyAt = now
		if m.awaitsCache(in) {
			m.saveInstance(in) // idle once its cache is attached
			break
		}
		if m.metrics != nil && !in.LaunchedAt.IsZero() {
			m.metrics.BootSeconds.WithLabelValues(in.Pool).Observe(now.Sub(in.LaunchedAt).Seconds())
		}
		m.setState(in, Idle, ReasonReady)
		m.dispatchLocked()
	default:
		m.saveInstance(in)
	}
	return nil
}

// Assignment implements bootstrap.Backend. An instance polling with an empty
// current has no worker running: that is how a releasing instance says it is
// clean again.
func (m *Manager) Assignment(ctx context.Context, key string, poll bootstrap.Poll) (bootstrap.Assignment, error) {
	timer := m.clock.NewTimer(poll.Wait)
	defer timer.Stop()
	for {
		m.mu.Lock()
		a := bootstrap.Assignment{State: bootstrap.AssignTerminate}
		var changed <-chan struct{}
		if in, err := m.instanceLocked(key); err == nil {
			in.LastSeen = m.clock.Now()
			a = m.assignmentLocked(in, poll)
			// Only what changes this instance's assignment wakes it.
			changed = m.instanceChange(in)
		}
		saved := m.synced()
		m.unlock()
		if a.State != bootstrap.AssignNone || a.NewToken != "" {
			// On disk before the instance acts on it: a bootstrap told to
			// stop, to take a lease or to use a new token does so, and a
			// crash must not undo the decision behind it.
			if err := saved.Wait(); err != nil {
				return bootstrap.Assignment{}, fmt.Errorf("saving the assignment of %s: %w", key, err)
			}
			return a, nil
		}
		select {
		case <-changed:
		case <-timer.C():
			return a, nil
		case <-ctx.Done():
			return a, nil
		}
	}
}

func (m *Manager) assignmentLocked(in *Instance, poll bootstrap.Poll) bootstrap.Assignment {
	a := m.nextAssignmentLocked(in, poll)
	// The token the instance booted with is in its user-data, which
	// anything on the instance can read from the metadata service: it is
	// replaced before any build runs there. A poll with the old token after
	// a new one was sent means the answer that carried it was lost (a
	// crash, a cut connection): send another.
	lost := in.NextTokenHash != "" && poll.TokenHash != "" && poll.TokenHash != in.NextTokenHash
	if poll.Rotate && a.NewToken == "" && (!in.TokenRotated || lost) && a.State != bootstrap.AssignTerminate {
		a.NewToken = m.rotateTokenLocked(in)
	}
	return a
}

func (m *Manager) nextAssignmentLocked(in *Instance, poll bootstrap.Poll) bootstrap.Assignment {
	current, run := poll.Current, poll.Run
	p := m.pools[in.Pool]
	a := bootstrap.Assignment{State: bootstrap.AssignNone}
	if p != nil {
		a.CleanupCommand = p.spec.CleanupCommand
		a.WorkerUser = p.spec.WorkerUser
	}
	switch in.State {
	case Terminating, Gone:
		a.State = bootstrap.AssignTerminate
		return a
	case Saving:
		// Flush your cache; once it says it has, the snapshot starts and
		// the poll waits for the end.
		if poll.Cache != bootstrap.CacheSaved {
			a.State = bootstrap.AssignSaveCache
			return a
		}
		m.snapshotCacheLocked(in)
		return a
	case Idle:
		if in.refresh != nil {
			// A snapshot of its cache while it lives: flush it, and once
			// it has, the snapshot (the instance waits for it, unleased).
			if poll.Cache == "" {
				a.State = bootstrap.AssignSyncCache
				return a
			}
			m.snapshotCacheLocked(in)
		}
	}
	l := m.leases[in.LeaseID]
	if l != nil && l.State == LeaseActive && (in.State == Leased || in.State == Draining) {
		// The lease held asks for more only with a run the instance has
		// not started, to a bootstrap that takes runs.
		if l.ID == current && (run < 0 || l.Run == nil || l.Run.ID <= run || m.runExitedLocked(l)) {
			return a
		}
		a.State = bootstrap.AssignAssigned
		a.LeaseID = l.ID
		a.WorkerName, a.WorkerPassword, a.WorkerMaster = l.Worker.Name, l.Worker.Password, l.Worker.Master
		if p != nil && !l.NoWorker {
			a.WorkerCommand = p.spec.WorkerCommand
		}
		// A run on a lease made without one waits for the instance to
		// have taken the lease (and started its worker). An exited run is
		// never handed out again, not even to a bootstrap that lost track.
		if l.Run != nil && (l.ID == current || l.NoWorker) && !m.runExitedLocked(l) {
			a.RunID, a.RunCommand = l.Run.ID, shellCommand(l.Run.Command)
		}
		return a
	}
	if current != "" {
		a.State = bootstrap.AssignReleased
		if poll.Rotate {
			// Whatever ran for the lease could read the token: it dies
			// with the lease, and only the bootstrap learns the next.
			a.NewToken = m.rotateTokenLocked(in)
		}
		return a
	}
	if in.State == Releasing {
		m.setState(in, Idle, ReasonWorkerStopped)
		m.dispatchLocked()
		// The dispatch may have handed it a queued lease: answer with it
		// now, not when this long-poll times out.
		return m.nextAssignmentLocked(in, poll)
	}
	return a
}

// rotateTokenLocked makes a new bootstrap token for in and returns it, to
// be sent in an assignment answer. Only its hash is kept. The old token
// works until the instance first uses the new one (Authenticate), so an
// answer lost on the way does not lock the instance out; a token sent
// earlier and never used dies now.
func (m *Manager) rotateTokenLocked(in *Instance) string {
	token := randomToken(32)
	if in.NextTokenHash != "" {
		delete(m.byToken, in.NextTokenHash)
	}
	in.NextTokenHash = bootstrap.HashToken(token)
	in.TokenRotated = true
	m.byToken[in.NextTokenHash] = in
	m.saveInstance(in)
	return token
}

// Heartbeat implements bootstrap.Backend.
func (m *Manager) Heartbeat(ctx context.Context, key string, hb bootstrap.Heartbeat) error {
	m.mu.Lock()
	defer m.unlock()
	in, err := m.instanceLocked(key)
	if err != nil {
		return err
	}
	in.LastSeen = m.clock.Now()
	if hb.Worker == "exited" && in.State == Leased {
		m.log.Info("worker exited", "pool", in.Pool, "instance", in.ID, "lease", in.LeaseID, "exit_code", hb.ExitCode)
	}
	if hb.RunID != 0 && hb.LeaseID == in.LeaseID {
		// Usually known already; this is for an exit report a restart lost.
		// Best effort: a run already ended or gone is no error of the
		// heartbeat's, which has done its work (LastSeen) either way.
		_ = m.exitLocked(in, hb.LeaseID, hb.RunID, hb.RunExitCode)
	}
	return nil
}

// checkIdentity checks that e's identity document is signed by the cloud,
// is of the provider's region (and account, when set), names the instance
// enrolling, and is of a machine started for a batch this recent.
func checkIdentity(c *IdentityCheck, e bootstrap.Enrollment, intentAt time.Time) error {
	if len(e.Document) == 0 {
		return errors.New("no identity document")
	}
	d, err := c.Verifier.Verify(c.Region, e.Document, e.Signature)
	if err != nil {
		return err
	}
	switch {
	case d.InstanceID != e.InstanceID:
		return fmt.Errorf("the document is of instance %q", d.InstanceID)
	case c.Account != "" && d.AccountID != c.Account:
		return fmt.Errorf("the document is of account %q", d.AccountID)
	case d.PendingTime.Before(intentAt.Add(-identitySkew)):
		return fmt.Errorf("the document's instance started at %s, before its batch was meant (%s)", d.PendingTime.Format(time.RFC3339), intentAt.Format(time.RFC3339))
	}
	return nil
}
