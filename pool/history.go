package pool

import (
	"cmp"
	"math"
	"slices"
	"sort"
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

	// quiet caches quietRate for the newest bucket it was computed at.
	quiet   float64
	quietAt int64
}

func newDemand(now time.Time) *demand {
	return &demand{Start: now, Minutes: newCountRing(time.Minute, minuteBuckets, now),
		Buckets: newCountRing(bucketWidth, historyBuckets, now), quietAt: math.MinInt64}
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

func (d *demand) observeBoot(b time.Duration) { d.BootS = keepLast(d.BootS, b.Seconds(), bootSamples) }

func (d *demand) observeLease(l time.Duration) {
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

// quietRate is the half-hour rate, a second, at or below which the
// history saw at most quietShare of its requests: at or below it, the
// pool keeps no spares (autoscale.go). Each ten-minute bucket's requests
// count at the rate of the half hour around it, as a request sees the
// rate of its time. 0 until the history has a day.
func (d *demand) quietRate(now time.Time) float64 {
	d.advance(now)
	if d.Buckets.Last == d.quietAt {
		return d.quiet
	}
	d.quietAt = d.Buckets.Last
	d.quiet = 0
	if now.Sub(d.Start) < 24*time.Hour {
		return 0
	}
	// Whole buckets only, since the history began.
	first := max(d.Buckets.Last-int64(len(d.Buckets.Counts))+1, d.Buckets.index(d.Start)+1)
	last := d.Buckets.Last - 1
	type rated struct {
		halfHour int64 // requests in the half hour around the bucket
		requests int64
	}
	var rs []rated
	var total int64
	for i := first; i <= last; i++ {
		if c := int64(*d.Buckets.slot(i)); c > 0 {
			rs = append(rs, rated{d.Buckets.sum(max(i-1, first), min(i+1, last)), c})
			total += c
		}
	}
	slices.SortFunc(rs, func(a, b rated) int { return cmp.Compare(a.halfHour, b.halfHour) })
	budget := quietShare * float64(total)
	var seen int64
	for i := 0; i < len(rs); {
		j := i
		for j < len(rs) && rs[j].halfHour == rs[i].halfHour {
			seen += rs[j].requests
			j++
		}
		if float64(seen) > budget {
			break
		}
		d.quiet = float64(rs[i].halfHour) / float64(3*d.Buckets.WidthS)
		i = j
	}
	return d.quiet
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
// after it. A lease older than any seen counts nothing.
func (d *demand) expectedFrees(ages []time.Duration, w time.Duration) float64 {
	if len(d.LeaseS) < minHolds || w <= 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(d.LeaseS))
	// above is how many lasted longer than x seconds.
	above := func(x float64) int { return len(s) - sort.SearchFloat64s(s, math.Nextafter(x, math.Inf(1))) }
	var frees float64
	for _, a := range ages {
		longer := above(a.Seconds())
		if longer == 0 {
			continue
		}
		frees += float64(longer-above((a+w).Seconds())) / float64(longer)
	}
	return frees
}
