// Package clock is Hangar's one source of time. Everything that decides by
// time (the pool's timers, long polls, reconcile and tick loops, the EC2
// provider's backoff and rate limits, the bootstrap script cache, the
// Jenkins watcher) takes a Clock, so that a test can run a day of pool life
// in a moment of wall time with testutil.FakeClock, deterministically.
package clock

import "time"

// Clock tells the time and makes timers and tickers that follow it.
type Clock interface {
	Now() time.Time
	// NewTimer fires once, d after Now. A d ≤ 0 fires at once.
	NewTimer(d time.Duration) Timer
	// NewTicker fires every d (d > 0) until stopped.
	NewTicker(d time.Duration) Ticker
}

// Timer is a time.Timer of a Clock.
type Timer interface {
	C() <-chan time.Time
	// Stop prevents the timer from firing; it reports whether it did.
	Stop() bool
}

// Ticker is a time.Ticker of a Clock.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// Real is the wall clock.
var Real Clock = realClock{}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

func (realClock) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }

type realTicker struct{ t *time.Ticker }

func (t realTicker) C() <-chan time.Time { return t.t.C }
func (t realTicker) Stop()               { t.t.Stop() }

// Sleep waits for d on c, or until done is closed; it reports whether the
// whole d passed.
func Sleep(c Clock, d time.Duration, done <-chan struct{}) bool {
	t := c.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return true
	case <-done:
		return false
	}
}
