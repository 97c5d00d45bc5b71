// Package testutil holds what tests of several packages share: a fake
// clock, and polling until a condition holds.
package testutil

import (
	"slices"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/internal/clock"
)

// FakeClock is a clock.Clock that moves only when told to. Its timers and
// tickers fire, in time order, as Advance passes their moments.
type FakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []*fakeWaiter
	// changed is closed and replaced whenever a timer or ticker is made,
	// so a test can wait for the code under test to start waiting.
	changed chan struct{}
}

var _ clock.Clock = (*FakeClock)(nil)

// NewFakeClock starts at a fixed moment, so that tests are repeatable.
func NewFakeClock() *FakeClock {
	return &FakeClock{now: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC), changed: make(chan struct{})}
}

// NewFakeClockAt starts at t.
func NewFakeClockAt(t time.Time) *FakeClock {
	c := NewFakeClock()
	c.now = t
	return c
}

func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

type fakeWaiter struct {
	c      *FakeClock
	at     time.Time
	period time.Duration // 0: a timer
	ch     chan time.Time
}

func (w *fakeWaiter) C() <-chan time.Time { return w.ch }

func (w *fakeWaiter) Stop() bool {
	w.c.mu.Lock()
	defer w.c.mu.Unlock()
	i := slices.Index(w.c.waiters, w)
	if i < 0 {
		return false
	}
	w.c.waiters = slices.Delete(w.c.waiters, i, i+1)
	return true
}

type fakeTicker struct{ *fakeWaiter }

func (t fakeTicker) Stop() { t.fakeWaiter.Stop() }

func (c *FakeClock) NewTimer(d time.Duration) clock.Timer {
	return c.add(d, 0)
}

func (c *FakeClock) NewTicker(d time.Duration) clock.Ticker {
	if d <= 0 {
		panic("non-positive interval for NewTicker")
	}
	return fakeTicker{c.add(d, d)}
}

func (c *FakeClock) add(d, period time.Duration) *fakeWaiter {
	c.mu.Lock()
	defer c.mu.Unlock()
	// Buffered like time's: a tick nobody reads is dropped, not blocking.
	w := &fakeWaiter{c: c, at: c.now.Add(d), period: period, ch: make(chan time.Time, 1)}
	if d <= 0 {
		w.ch <- c.now
	} else {
		c.waiters = append(c.waiters, w)
	}
	close(c.changed)
	c.changed = make(chan struct{})
	return w
}

// Advance moves the clock forward by d, firing every timer and ticker due
// on the way, earliest first, each at its own moment.
func (c *FakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	end := c.now.Add(d)
	for {
		var next *fakeWaiter
		for _, w := range c.waiters {
			if !w.at.After(end) && (next == nil || w.at.Before(next.at)) {
				next = w
			}
		}
		if next == nil {
			break
		}
		if next.at.After(c.now) {
			c.now = next.at
		}
		sent := false
		select {
		case next.ch <- c.now:
			sent = true
		default:
		}
		if next.period > 0 {
			next.at = next.at.Add(next.period)
			if !sent && !next.at.After(end) {
				// Its last tick is unread, so every tick up to end
				// would be dropped too: skip them, as a time.Ticker
				// drops ticks for a slow reader.
				n := end.Sub(next.at)/next.period + 1
				next.at = next.at.Add(n * next.period)
			}
		} else {
			c.waiters = slices.DeleteFunc(c.waiters, func(w *fakeWaiter) bool { return w == next })
		}
	}
	c.now = end
	c.mu.Unlock()
}

// Set moves the clock to t (forward only), as Advance does.
func (c *FakeClock) Set(t time.Time) {
	c.Advance(t.Sub(c.Now()))
}

// Waiters is how many timers and tickers wait to fire.
func (c *FakeClock) Waiters() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.waiters)
}

// Changed is closed when the next timer or ticker is made.
func (c *FakeClock) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}
