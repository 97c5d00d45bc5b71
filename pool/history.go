package pool

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// What an autoscaled pool remembers of its demand, to estimate
// AutoscaleInput: when lease requests came (per minute for the last two
// hours, per ten minutes for eight days, so that "this time yesterday"
// and "this time last week" can be read), how long its instances took to
// boot, and how long leases held them. It is one small record per pool in
// the store (store.Demand), written at most once a minute, so that a
// restart keeps what the pool has learnt. Every time is the manager's
// clock's.
const (
	minuteBuckets  = 120
	bucketWidth    = 10 * time.Minute
	historyBuckets = 8*24*6 + 6 // eight days and an hour
	bootSamples    = 32
	holdSamples    = 64
	pushSamples    = 64
	// gapSamples is how many pushes' gaps are kept: enough that the
	// quantile of the quiet before the latest requests (activeFor) rests
	// on a few hundred pushes, some days of a small project's CI.
	gapSamples = 256
	// minGaps is how many gaps it takes to read activeFor.
	minGaps = 16
	// pushGap: requests this close to the one before are of one push (a
	// CI matrix is requested within seconds).
	pushGap = 10 * time.Second
	// defaultBoot is planned for until the pool has seen a boot.
	defaultBoot = time.Minute
	// recentShort and recentLong are the windows of the recent rate: the
	// short one sees a rush within minutes, the long one forgets it only
	// slowly.
	recentShort = 5 * time.Minute
	recentLong  = 30 * time.Minute
	// historyBefore and historyAfter frame the window of the history read
	// at "this time" a day or a week ago: it looks ahead, so that spares
	// are booted before a daily rush, not during it.
	historyBefore = 10 * time.Minute
	historyAfter  = 20 * time.Minute
	// outcomeMemory is about how many of the latest requests missedShare
	// weighs; minOutcomes, how many it takes to read it.
	outcomeMemory = 1000
	minOutcomes   = 200
	// minHolds is how many lease durations it takes to expect releases.
	minHolds = 5
)

// countRing counts events in fixed-width buckets, the newest Last, the
// oldest len(Counts)-1 before it; older ones are dropped as time moves on.
type countRing struct {
	WidthS int64   `json:"width_s"`
	Last   int64   `json:"last"` // the newest bucket: unix seconds / WidthS
	Counts []int32 `json:"counts"`
}

func newCountRing(width time.Duration, n int, now time.Time) countRing {
	r := countRing{WidthS: int64(width / time.Second), Counts: make([]int32, n)}
	r.Last = r.index(now)
	return r
}

func (r *countRing) valid(width time.Duration, n int) bool {
	return r.WidthS == int64(width/time.Second) && len(r.Counts) == n
}

func (r *countRing) index(t time.Time) int64 { return floorDiv(t.Unix(), r.WidthS) }

func (r *countRing) slot(i int64) *int32 {
	n := int64(len(r.Counts))
	return &r.Counts[((i%n)+n)%n]
}

// advance makes bucket i the newest, emptying those it passes.
func (r *countRing) advance(i int64) {
	if i <= r.Last {
		return
	}
	if i-r.Last >= int64(len(r.Counts)) {
		clear(r.Counts)
	} else {
		for j := r.Last + 1; j <= i; j++ {
			*r.slot(j) = 0
		}
	}
	r.Last = i
}

func (r *countRing) add(t time.Time) {
	i := r.index(t)
	r.advance(i)
	if i > r.Last-int64(len(r.Counts)) {
		*r.slot(i)++
	}
}

// sum counts the events of buckets from to to, inclusive, that the ring
// still holds.
func (r *countRing) sum(from, to int64) int64 {
	from = max(from, r.Last-int64(len(r.Counts))+1)
	to = min(to, r.Last)
	var n int64
	for i := from; i <= to; i++ {
		n += int64(*r.slot(i))
	}
	return n
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// gapSample is one push as activeFor weighs it: the quiet before it, in
// seconds, and its requests.
type gapSample struct {
	S float64 `json:"s"`
	N int     `json:"n"`
}

// demand is one pool's history, as stored.
type demand struct {
	// Start is when the history begins: rates are not diluted by time
	// before it.
	Start   time.Time `json:"start"`
	Minutes countRing `json:"minutes"`
	Buckets countRing `json:"buckets"`
	BootS   []float64 `json:"boot_s,omitempty"`  // the latest boots, oldest first
	LeaseS  []float64 `json:"lease_s,omitempty"` // the latest released leases' durations
	// Pushes are the sizes of the latest pushes, requests that came
	// within pushGap of the one before; Open is the size so far of the
	// one under way, whose latest request came at LastAt.
	Pushes []int     `json:"pushes,omitempty"`
	Open   int       `json:"open,omitempty"`
	LastAt time.Time `json:"last_at,omitzero"`
	// Gaps are the latest pushes' sizes with the quiet before each, from
	// the latest request of the push before to its first; OpenGapS is the
	// one under way's (-1: it is the first).
	Gaps     []gapSample `json:"gaps,omitempty"`
	OpenGapS float64     `json:"open_gap_s,omitempty"`

	// Requests, Deliberate and Late count requests with a memory of about
	// outcomeMemory of them: all of them, those that came while the pool
	// kept no spares on purpose (idle, autoscale.go), and those
	// that waited longer than the target (counted at their release).
	Requests   float64 `json:"requests,omitempty"`
	Deliberate float64 `json:"deliberate,omitempty"`
	Late       float64 `json:"late,omitempty"`
	// Allowed sums, with the same memory, the idle share in force at each
	// request: the late requests the idle rule was allotted. What idling
	// really cost is in Late; taking Allowed rather than Deliberate from it
	// feeds an idle rule that overspends its share back into the budget.
	Allowed float64 `json:"allowed,omitempty"`

	// byQuiet are Gaps, longest quiet first, and leaseSorted, LeaseS in
	// order: kept between changes, for a pool decides every few seconds
	// and they change with pushes and releases.
	byQuiet     []gapSample
	leaseSorted []float64
}

func newDemand(now time.Time) *demand {
	return &demand{Start: now, Minutes: newCountRing(time.Minute, minuteBuckets, now),
		Buckets: newCountRing(bucketWidth, historyBuckets, now)}
}

// usable reports whether a stored record can be read as this version's.
func (d *demand) usable() bool {
	return d != nil && !d.Start.IsZero() && d.Minutes.valid(time.Minute, minuteBuckets) && d.Buckets.valid(bucketWidth, historyBuckets)
}

// advance moves both rings to now, so that reads see empty buckets for the
// minutes without requests.
func (d *demand) advance(now time.Time) {
	d.Minutes.advance(d.Minutes.index(now))
	d.Buckets.advance(d.Buckets.index(now))
}

func (d *demand) arrival(t time.Time) {
	d.Minutes.add(t)
	d.Buckets.add(t)
	if d.Open > 0 && t.Sub(d.LastAt) <= pushGap {
		d.Open++
	} else {
		if d.Open > 0 {
			d.Pushes = keepLast(d.Pushes, d.Open, pushSamples)
			if d.OpenGapS >= 0 {
				d.Gaps = keepLast(d.Gaps, gapSample{d.OpenGapS, d.Open}, gapSamples)
				d.byQuiet = nil
			}
			d.OpenGapS = max(t.Sub(d.LastAt).Seconds(), 0)
		} else {
			d.OpenGapS = -1
		}
		d.Open = 1
	}
	d.LastAt = t
}

// batches are the latest pushes' sizes, the one under way included (as
// big as it is so far).
func (d *demand) batches() []int {
	if d.Open == 0 {
		return d.Pushes
	}
	return append(slices.Clip(d.Pushes), d.Open)
}

// requested counts a request's outcome so far: whether it came while the
// pool kept no spares on purpose.
func (d *demand) requested(deliberate bool, allowed float64) {
	d.Requests = decay(d.Requests, true)
	d.Allowed = d.Allowed*(1-1.0/outcomeMemory) + allowed
	d.Deliberate = decay(d.Deliberate, deliberate)
}

// served counts whether a request waited longer than the target.
func (d *demand) served(late bool) { d.Late = decay(d.Late, late) }

func decay(n float64, one bool) float64 {
	n *= 1 - 1.0/outcomeMemory
	if one {
		n++
	}
	return n
}

// missedShare is the share of the latest requests that waited longer than
// the target though they came while the pool meant to serve them at once:
// what its sizing misses (back-to-back pushes within a boot, pushes larger
// than the spares), which the idle rule must leave room for.
// -1 until minOutcomes requests are counted.
func (d *demand) missedShare() float64 {
	if d.Requests < minOutcomes {
		return -1
	}
	return max(d.Late-d.Allowed, 0) / d.Requests
}

func (d *demand) observeBoot(b time.Duration) { d.BootS = keepLast(d.BootS, b.Seconds(), bootSamples) }

func (d *demand) observeLease(l time.Duration) {
	d.leaseSorted = nil
	d.LeaseS = keepLast(d.LeaseS, l.Seconds(), holdSamples)
}

func keepLast[T any](s []T, v T, n int) []T {
	if len(s) >= n {
		s = append(s[:0], s[len(s)-n+1:]...)
	}
	return append(s, v)
}

// recentRate is requests a second: the higher of the last five minutes'
// rate and the last half hour's.
func (d *demand) recentRate(now time.Time) float64 {
	return max(d.rateOver(now, recentShort), d.rateOver(now, recentLong))
}

// rateOver is requests a second over the last w (whole minutes and the
// one under way), or over no more time than the history has.
func (d *demand) rateOver(now time.Time, w time.Duration) float64 {
	d.advance(now)
	cur := d.Minutes.index(now)
	into := now.Sub(time.Unix(cur*d.Minutes.WidthS, 0))
	span := max(now.Sub(d.Start), time.Minute)
	k := int64(w / time.Minute)
	n := d.Minutes.sum(cur-k+1, cur)
	over := min(time.Duration(k-1)*time.Minute+into, span)
	return float64(n) / max(over.Seconds(), 1)
}

// rateSinceStart is requests a second since the history began, over at
// most the eight days it keeps.
func (d *demand) rateSinceStart(now time.Time) float64 {
	d.advance(now)
	last := d.Buckets.index(now)
	first := max(d.Buckets.index(d.Start), last-int64(len(d.Buckets.Counts))+1)
	span := now.Sub(time.Unix(first*d.Buckets.WidthS, 0))
	return float64(d.Buckets.sum(first, last)) / max(span.Seconds(), 60)
}

// historyRate is the rate a week ago, from ten minutes before this time to
// twenty after, once the history is that old; before, a day ago; 0 before
// that.
func (d *demand) historyRate(now time.Time) float64 {
	d.advance(now)
	age := now.Sub(d.Start)
	var back time.Duration
	switch {
	case age >= 7*24*time.Hour+historyBefore:
		back = 7 * 24 * time.Hour
	case age >= 24*time.Hour+historyBefore:
		back = 24 * time.Hour
	default:
		return 0
	}
	from := d.Buckets.index(now.Add(-back - historyBefore))
	to := from + int64((historyBefore+historyAfter)/bucketWidth) - 1
	n := d.Buckets.sum(from, to)
	return float64(n) / (float64(to-from+1) * float64(d.Buckets.WidthS))
}

// activeFor is how long after a request the pool keeps spares: the
// shortest quiet such that the requests that came after a longer one were
// at most share of all, among the latest pushes (the one under way
// included, as big as it is so far); and the rate of requests over the
// time spares were so kept, a second. 0, 0 until minGaps pushes are known.
//
// A push is likelier to come soon after another (CI pushes come in
// working sessions), so the spares kept a while after each request serve
// the most requests for their cost, and those kept through long quiets
// the fewest: these are the requests to let wait (autoscale.go).
func (d *demand) activeFor(share float64) (time.Duration, float64) {
	longerFirst := func(a, b gapSample) int { return cmp.Or(cmp.Compare(b.S, a.S), cmp.Compare(a.N, b.N)) }
	if d.byQuiet == nil {
		d.byQuiet = slices.SortedFunc(slices.Values(d.Gaps), longerFirst)
	}
	s := d.byQuiet
	if d.Open > 0 && d.OpenGapS >= 0 {
		open := gapSample{d.OpenGapS, d.Open}
		i, _ := slices.BinarySearchFunc(s, open, longerFirst)
		s = slices.Insert(slices.Clone(s), i, open)
	}
	if len(s) < minGaps {
		return 0, 0
	}
	total := 0
	for _, g := range s {
		total += g.N
	}
	// From the longest quiet down: the requests after quiets longer than
	// s[i].S may wait while they stay within the share.
	late := 0
	// When not even the requests after the longest quiet fit in the share,
	// the sample cannot say how long a quiet to bridge: a young history
	// has not seen its nights yet, and the next quiet is often the
	// longest so far. Bridge twice the longest, so that demand that stops
	// for good still lets the spares go.
	tau := 2 * s[0].S
	for i, g := range s {
		if float64(late+g.N) > share*float64(total) {
			if i > 0 {
				tau = g.S
			}
			break
		}
		late += g.N
		if i == len(s)-1 {
			tau = 0
		}
	}
	kept := 0.0
	for _, g := range s {
		kept += min(g.S, tau)
	}
	rate := 0.0
	if kept > 0 {
		rate = float64(total-late) / kept
	}
	return time.Duration(math.Ceil(tau)) * time.Second, rate
}

// bootQuantiles are the median and 90th percentile of the latest boots
// (nearest rank), defaultBoot before the first.
func (d *demand) bootQuantiles() (p50, p90 time.Duration) {
	if len(d.BootS) == 0 {
		return defaultBoot, defaultBoot
	}
	s := slices.Sorted(slices.Values(d.BootS))
	at := func(p float64) time.Duration {
		i := max(int(math.Ceil(p*float64(len(s))))-1, 0)
		return time.Duration(s[i] * float64(time.Second)).Round(time.Millisecond)
	}
	return at(0.5), at(0.9)
}

// expectedFrees is how many of the active leases of the given ages are
// expected to be released within w: for each, the share of the latest
// released leases that lasted longer than its age and ended within w
// after it. A lease older than any seen counts nothing. ages are in
// ascending order.
func (d *demand) expectedFrees(ages []time.Duration, w time.Duration) float64 {
	if len(d.LeaseS) < minHolds || w <= 0 {
		return 0
	}
	if d.leaseSorted == nil {
		d.leaseSorted = slices.Sorted(slices.Values(d.LeaseS))
	}
	s := d.leaseSorted
	// upTo and upToW count the leases that lasted at most a, and at most
	// a+w: both only grow with a.
	var frees float64
	upTo, upToW := 0, 0
	for _, a := range ages {
		for upTo < len(s) && s[upTo] <= a.Seconds() {
			upTo++
		}
		for upToW < len(s) && s[upToW] <= (a+w).Seconds() {
			upToW++
		}
		if longer := len(s) - upTo; longer > 0 {
			frees += float64(upToW-upTo) / float64(longer)
		}
	}
	return frees
}
