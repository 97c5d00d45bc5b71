package ec2test

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// This file is the EC2 the server pretends to be: regions, instances and
// their states, idempotency, and the faults tests inject. storage.go holds
// key pairs, volumes and snapshots, images.go images.

// EC2's instance state codes; the low byte of instanceState/code.
const (
	pending      = 0
	running      = 16
	shuttingDown = 32
	terminated   = 48
	stopping     = 64
	stopped      = 80
)

var stateNames = map[int]string{
	pending: "pending", running: "running", shuttingDown: "shutting-down",
	terminated: "terminated", stopping: "stopping", stopped: "stopped",
}

const (
	marketOnDemand = "on-demand"
	marketSpot     = "spot"
	vpcID          = "vpc-0e5e0e5e0e5e0e5e0"
	// maxUserData is EC2's limit on decoded user-data.
	maxUserData = 16 << 10
	// consoleTail is how much console EC2 returns: the last 64 KiB.
	consoleTail = 64 << 10
)

// DefaultImageID names the image every region of a server starts with, so
// a test that does not care about images can launch at once. (Real AMI ids
// are unique across regions; this one is the same everywhere for
// convenience.)
const DefaultImageID = "ami-0123456789abcdef0"

// Image is an AMI that DescribeImages lists and RunInstances accepts.
type Image struct {
	ID, Name     string
	Description  string
	Owner        string    // account id; default the server's, which "self" names
	Created      time.Time // default: when added
	State        string    // default "available"
	Architecture string    // default "x86_64"
	RootDevice   string    // default "/dev/xvda"
	RootVolumeGB int       // default 8; with Devices, the root device's size
	Tags         map[string]string
	// Devices are the image's EBS disks. Default: one of RootVolumeGB on
	// RootDevice, from a snapshot the server makes up and does not list
	// (as a public image's snapshot is not the account's).
	Devices []ImageDevice

	// What RegisterImage sets and AddImage leaves at the defaults of a
	// modern HVM image.
	virtualization, bootMode, imdsSupport string
	ena                                   bool
	// readyAt is when a pending image made by a client may become
	// available (once its snapshots are complete too); zero for images
	// added by the test, which keep their State.
	readyAt time.Time
	// backendID is the storage backend's copy of the image, which
	// launches boot from; "" if it has none. backendReady: the backend has
	// reported it available (always true without one).
	backendID    string
	backendReady bool
}

// ImageDevice is one block device mapping of an image.
type ImageDevice struct {
	Device     string // "/dev/xvda"
	SnapshotID string
	SizeGB     int
	VolumeType string // default "gp3"
	// DeleteOnTermination is the device's EC2 setting; AddImage's
	// defaults set it.
	DeleteOnTermination bool
}

// root is the root device's mapping.
func (im *Image) root() ImageDevice {
	for _, d := range im.Devices {
		if d.Device == im.RootDevice {
			return d
		}
	}
	return ImageDevice{Device: im.RootDevice, SizeGB: im.RootVolumeGB}
}

// Instance is a snapshot of one instance as the server holds it, for tests
// to check what a client asked for (tags, IMDS options, market …).
type Instance struct {
	ID          string
	State       string // EC2's name: pending, running, stopping …
	Type, Zone  string
	Subnet      string // "subnet-<zone>" even when the launch named none
	Image       string
	Market      string // "on-demand" or "spot"
	KeyName     string
	Profile     string // IAM instance profile ARN, "" for none
	ClientToken string
	PrivateIP   string
	PublicIP    string // the backend's, "" without one
	// SecurityGroups are the ids the launch named.
	SecurityGroups   []string
	Tags, VolumeTags map[string]string
	UserData         []byte // decoded
	RootVolumeGB     int    // 0: the image's size
	HTTPTokens       string // "optional" (EC2's default) or "required"
	HopLimit         int
	LaunchTime       time.Time
	// LaunchIndex is the instance's place in its launch (amiLaunchIndex).
	LaunchIndex int
}

type instance struct {
	id, reservation, clientToken string
	image, typ, zone, subnet, ip string
	publicIP                     string
	market, spotRequest          string
	keyName, profile, profileID  string
	groups                       []string
	rootDevice, volumeID         string
	rootGB                       int
	httpTokens, httpEndpoint     string
	hopLimit                     int
	tags, volumeTags             map[string]string
	userData                     []byte
	launchIndex                  int

	state    int
	reason   string    // stateTransitionReason
	since    time.Time // when state was entered
	launched time.Time // launchTime: resets on start, as on EC2
	created  time.Time // first launch, for HideNewFor
	seq      uint64    // listing order and pagination cursor
	dnsName  string    // see privateDNS
	// forgotten: no longer in its region's instances (terminated long ago,
	// or its id reused), so ordered drops it from the launch order.
	forgotten bool
}

// launchRecord is what a ClientToken launched.
type launchRecord struct {
	fingerprint string
	reservation string
	instances   []*instance
}

type throttle struct{ fraction, acc float64 }

// state is the server's EC2. launchMu serializes RunInstances and
// StartInstances whole (checks, backend launch, bookkeeping), so that quota
// and idempotency hold under concurrent calls without holding mu across a
// backend call; storageMu does the same for the calls that make, change
// or delete key pairs, volumes, snapshots and images. mu guards
// everything else. Lock order: launchMu or storageMu, then mu.
type state struct {
	launchMu  sync.Mutex
	storageMu sync.Mutex

	mu sync.Mutex
	// regions is fixed once New returns; what each holds is under mu.
	regions   map[string]*region
	def       *region // Options.Region
	seq       uint64  // listing order and page cursor of every resource
	ipSeq     int
	calls     map[string]int
	errs      map[string]int
	timeline  map[string][]Span
	throttles map[string]*throttle
	buckets   map[string]*bucket
	// resources are the instance buckets of RateLimitResource, by action.
	resources map[string]*bucket
	capacity  func(instanceType, zone, market string) string
	// capacityCount is SetCapacityCount's function.
	capacityCount func(instanceType, zone, market string) int
	quotaMax      int
	quotaCode     string
	hideFor       time.Duration
	// refused maps a DescribeInstances filter name (or "tag:" for every
	// tag filter) to how the server refuses it.
	refused map[string]RefuseMode
}

// region is one EC2 region: every instance, volume, snapshot, image and key
// pair lives in exactly one, and a request sees only its own region's.
type region struct {
	name      string
	zones     []string
	instances map[string]*instance
	launched  []*instance // instances in launch (seq) order; see ordered
	tokens    map[string]*launchRecord
	launches  map[string]int
	peak      int
	images    []Image
	keyPairs  map[string]*keyPair // by name
	volumes   map[string]*volume
	snapshots map[string]*snapshot
	// idempotent holds the ClientTokens of CreateVolume and CopyImage, by
	// action and token.
	idempotent map[string]tokenRecord
}

func defaultZones(region string) []string {
	return []string{region + "a", region + "b", region + "c"}
}

func (st *state) init(opts Options) {
	st.calls = map[string]int{}
	st.errs = map[string]int{}
	st.timeline = map[string][]Span{}
	st.throttles = map[string]*throttle{}
	st.buckets = map[string]*bucket{}
	st.resources = map[string]*bucket{}
	st.refused = map[string]RefuseMode{}
	st.regions = map[string]*region{}
	for _, name := range opts.Regions {
		rg := &region{
			name: name, zones: defaultZones(name),
			instances: map[string]*instance{}, tokens: map[string]*launchRecord{}, launches: map[string]int{},
			keyPairs: map[string]*keyPair{}, volumes: map[string]*volume{}, snapshots: map[string]*snapshot{},
			idempotent: map[string]tokenRecord{},
			images: []Image{fillImage(Image{
				ID: DefaultImageID, Name: "ec2test-default", Owner: opts.Account,
				Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
			})},
		}
		if name == opts.Region {
			rg.zones = slices.Clone(opts.Zones)
			st.def = rg
		}
		st.regions[name] = rg
	}
}

// fillImage gives an image added by a test its defaults.
func fillImage(im Image) Image {
	if im.State == "" {
		im.State = cloud.ImageAvailable
	}
	if im.Architecture == "" {
		im.Architecture = "x86_64"
	}
	if im.RootDevice == "" {
		im.RootDevice = "/dev/xvda"
	}
	if im.Created.IsZero() {
		im.Created = time.Now()
	}
	im.Tags = maps.Clone(im.Tags)
	im.Devices = slices.Clone(im.Devices)
	if len(im.Devices) == 0 {
		im.Devices = []ImageDevice{{Device: im.RootDevice, SnapshotID: newHexID("snap-"), SizeGB: cmp.Or(im.RootVolumeGB, 8)}}
	}
	for i := range im.Devices {
		d := &im.Devices[i]
		if d.VolumeType == "" {
			d.VolumeType, d.DeleteOnTermination = "gp3", true
		}
		if d.Device == im.RootDevice {
			im.RootVolumeGB = d.SizeGB
		}
	}
	im.virtualization, im.bootMode, im.ena = "hvm", "", true
	im.backendReady = true
	return im
}

// ---- fault injection and observation ----

// Throttle makes a fraction (0..1) of the calls to action answer
// RequestLimitExceeded; action "" applies to every action that has no
// setting of its own. It is deterministic: with 0.3, exactly 3 calls in
// every 10 are throttled, spread evenly, so tests can count.
func (s *Server) Throttle(action string, fraction float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if fraction <= 0 {
		delete(s.throttles, action)
		return
	}
	s.throttles[action] = &throttle{fraction: math.Min(fraction, 1)}
}

// RateLimit makes action behave like EC2's request token bucket: burst
// calls at once, refilled at perSecond; a call that finds the bucket empty
// answers RequestLimitExceeded. perSecond <= 0 removes the limit.
func (s *Server) RateLimit(action string, burst int, perSecond float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if perSecond <= 0 {
		delete(s.buckets, action)
		return
	}
	s.buckets[action] = &bucket{capacity: float64(burst), tokens: float64(burst), rate: perSecond, at: time.Now()}
}

// RateLimitResource gives action the resource token bucket EC2 keeps next
// to its request bucket, counting instances rather than requests: burst
// instances at once, refilled at perSecond. RunInstances is charged for
// the instances a launch starts, TerminateInstances, StopInstances and
// StartInstances for the instances whose state they change; a call the
// bucket cannot pay for answers RequestLimitExceeded and acts on none, as
// on AWS (RunInstances: 1,000, refilled 2/s; TerminateInstances: 1,000 at
// 20/s). A replayed launch (same ClientToken) starts nothing and costs
// nothing. perSecond <= 0 removes the limit.
func (s *Server) RateLimitResource(action string, burst int, perSecond float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if perSecond <= 0 {
		delete(s.resources, action)
		return
	}
	s.resources[action] = &bucket{capacity: float64(burst), tokens: float64(burst), rate: perSecond, at: time.Now()}
}

type bucket struct {
	capacity, tokens, rate float64
	at                     time.Time
}

func (b *bucket) take(now time.Time) bool { return b.takeN(now, 1) }

// takeN takes n tokens if the bucket holds them.
func (b *bucket) takeN(now time.Time, n float64) bool {
	b.tokens = math.Min(b.capacity, b.tokens+now.Sub(b.at).Seconds()*b.rate)
	b.at = now
	if b.tokens < n {
		return false
	}
	b.tokens -= n
	return true
}

// chargeResource takes n instances from action's resource bucket, if it
// has one; refund gives back what was not used.
func (s *Server) chargeResource(action string, n int) (refund func(unused int), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.resources[action]
	if b == nil || n <= 0 {
		return func(int) {}, nil
	}
	if !b.takeN(time.Now(), float64(n)) {
		return nil, errorf("RequestLimitExceeded", "Request limit exceeded.")
	}
	return func(unused int) {
		s.mu.Lock()
		defer s.mu.Unlock()
		b.tokens = math.Min(b.capacity, b.tokens+float64(unused))
	}, nil
}

func (s *Server) throttled(action string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.buckets[action]; b != nil && !b.take(time.Now()) {
		return true
	}
	t := s.throttles[action]
	if t == nil {
		t = s.throttles[""]
	}
	if t == nil {
		return false
	}
	t.acc += t.fraction
	if t.acc >= 1-1e-9 {
		t.acc--
		return true
	}
	return false
}

// SetCapacity installs f, asked before every launch and start: it returns
// "" to allow it, or the EC2 error code to fail with, such as
// "InsufficientInstanceCapacity", "Unsupported", "SpotMaxPriceTooLow",
// "MaxSpotInstanceCountExceeded". market is "on-demand" or "spot". nil
// restores unlimited capacity.
func (s *Server) SetCapacity(f func(instanceType, zone, market string) (code string)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.capacity = f
}

// SetCapacityCount installs f, asked before every launch: how many
// instances of the offering EC2 can start now (negative: any number). As
// on EC2, a launch gets as many as there are, up to MaxCount, if that is
// at least its MinCount, and fails with InsufficientInstanceCapacity
// otherwise. nil removes the limit. Starts of stopped instances are not
// counted.
func (s *Server) SetCapacityCount(f func(instanceType, zone, market string) int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.capacityCount = f
}

// capacityFor is how many of maxCount the offering can start, asked
// outside mu so that f may call the Server.
func (s *Server) capacityFor(rg *region, req *runRequest) (int, error) {
	s.mu.Lock()
	f := s.capacityCount
	s.mu.Unlock()
	if f == nil {
		return req.maxCount, nil
	}
	c := f(req.typ, req.zone, req.market)
	if c < 0 {
		return req.maxCount, nil
	}
	if c < req.minCount {
		return 0, s.capacityError(rg, "InsufficientInstanceCapacity", req.typ, req.zone, req.market)
	}
	return min(c, req.maxCount), nil
}

// SetQuota fails launches and starts with code ("InstanceLimitExceeded" or
// "VcpuLimitExceeded") once pending plus running instances would exceed
// maxRunning. Like EC2, a launch with MinCount < MaxCount gets as many as
// fit. code "" removes the quota.
func (s *Server) SetQuota(maxRunning int, code string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.quotaMax, s.quotaCode = maxRunning, code
}

// HideNewFor emulates EC2's eventual consistency: for d after its launch an
// instance is missing from DescribeInstances, and every call naming its id
// (Describe, Terminate, Stop, Start, CreateTags, GetConsoleOutput …)
// answers InvalidInstanceID.NotFound.
func (s *Server) HideNewFor(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hideFor = d
}

// RefuseMode is how a server refuses a DescribeInstances filter it is told
// not to serve: see RefuseFilter.
type RefuseMode int

const (
	// Serve the filter (the default).
	Serve RefuseMode = iota
	// Refuse400 answers InvalidParameterValue with HTTP 400, as EC2 does for
	// a filter it does not know.
	Refuse400
	// HTML500 answers HTTP 500 with an HTML page, as some EC2-compatible
	// clouds and emulators do for what they do not implement: no EC2 error
	// code, and a body no XML decoder can read. Errors counts it as
	// "DescribeInstances/HTML500".
	HTML500
)

// RefuseFilter makes DescribeInstances refuse every request that uses the
// filter name ("client-token", "tag:hangar:intent"; "tag:" means every
// tag filter) as mode says, to play a cloud that lacks it. Serve restores
// it.
func (s *Server) RefuseFilter(name string, mode RefuseMode) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if mode == Serve {
		delete(s.refused, name)
		return
	}
	s.refused[name] = mode
}

// refusal returns the error for a request using filters, or nil.
func (s *Server) refusal(filters []filter) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range filters {
		mode := s.refused[f.name]
		if mode == Serve && strings.HasPrefix(f.name, "tag:") {
			mode = s.refused["tag:"]
		}
		switch mode {
		case Refuse400:
			return errorf("InvalidParameterValue", "The filter '%s' is invalid", f.name)
		case HTML500:
			return errHTML500
		}
	}
	return nil
}

// errHTML500 makes serveHTTP answer with htmlPage.
var errHTML500 = errors.New("ec2test: refused with an HTML page")

// htmlPage is what a web server in front of a cloud sends when the cloud
// fails: HTML, and not well-formed XML either (<meta> and <hr> are never
// closed), so that no XML decoder reads it.
const htmlPage = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>500 Internal Server Error</title></head>
<body><h1>500 Internal Server Error</h1><hr><p>The server encountered an internal error.</p></body></html>
`

// AddImage adds an image to the default region, or replaces the one with
// its id (DefaultImageID included). Defaults are as documented on Image.
func (s *Server) AddImage(im Image) { s.Region("").AddImage(im) }

// Calls counts requests per action, throttled and failed ones included.
func (s *Server) Calls() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.calls)
}

// Errors counts error responses per "Action/Code", e.g.
// "RunInstances/RequestLimitExceeded".
func (s *Server) Errors() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.errs)
}

// Launches is how many RunInstances calls with clientToken started
// instances in the default region. Idempotency means it is never more
// than 1.
func (s *Server) Launches(clientToken string) int { return s.Region("").Launches(clientToken) }

// Running is the number of instances pending or running now in the
// default region.
func (s *Server) Running() int { return s.Region("").Running() }

// PeakRunning is the most instances ever pending or running at once in
// the default region.
func (s *Server) PeakRunning() int { return s.Region("").PeakRunning() }

// Instances returns every listed instance of the default region, hidden
// ones included, in launch order.
func (s *Server) Instances() []Instance { return s.Region("").Instances() }

// Region is one region of a server, for a test to set up and inspect.
type Region struct {
	s  *Server
	rg *region
}

// Region returns the region called name; "" is the default region. It
// panics if the server does not serve name: that is a mistake in the test.
func (s *Server) Region(name string) *Region {
	rg := s.def
	if name != "" {
		rg = s.regions[name]
	}
	if rg == nil {
		panic(fmt.Sprintf("ec2test: region %q is not served (Options.Regions is %v)", name, s.opts.Regions))
	}
	return &Region{s, rg}
}

// Name is the region's name ("us-east-1").
func (r *Region) Name() string { return r.rg.name }

// Zones are the region's availability zones.
func (r *Region) Zones() []string { return slices.Clone(r.rg.zones) }

// AddImage adds an image, or replaces the one with its id (DefaultImageID
// included). Defaults are as documented on Image.
func (r *Region) AddImage(im Image) {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	im.Owner = cmp.Or(im.Owner, r.s.opts.Account)
	im = fillImage(im)
	if i := slices.IndexFunc(r.rg.images, func(o Image) bool { return o.ID == im.ID }); i >= 0 {
		r.rg.images[i] = im
		return
	}
	r.rg.images = append(r.rg.images, im)
}

// Launches is how many RunInstances calls with clientToken started
// instances. Idempotency means it is never more than 1.
func (r *Region) Launches(clientToken string) int {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	return r.rg.launches[clientToken]
}

// Running is the number of instances pending or running now.
func (r *Region) Running() int {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	return r.s.active(r.rg, time.Now())
}

// PeakRunning is the most instances ever pending or running at once.
func (r *Region) PeakRunning() int {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	return r.rg.peak
}

// Instances returns every listed instance, hidden ones included, in launch
// order.
func (r *Region) Instances() []Instance {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	var out []Instance
	for _, in := range r.s.ordered(r.rg, time.Now()) {
		out = append(out, Instance{
			ID: in.id, State: stateNames[in.state], Type: in.typ, Zone: in.zone, Subnet: in.subnet,
			Image: in.image, Market: in.market, KeyName: in.keyName, Profile: in.profile,
			ClientToken: in.clientToken, PrivateIP: in.ip, PublicIP: in.publicIP, SecurityGroups: slices.Clone(in.groups),
			Tags: maps.Clone(in.tags), VolumeTags: maps.Clone(in.volumeTags),
			UserData: slices.Clone(in.userData), RootVolumeGB: in.rootGB,
			HTTPTokens: in.httpTokens, HopLimit: in.hopLimit, LaunchTime: in.launched,
			LaunchIndex: in.launchIndex,
		})
	}
	return out
}

func (s *Server) countCall(action string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls[action]++
}

// Span is one request as the server handled it: when it arrived, when
// the answer was written, and its error code ("" for success).
type Span struct {
	Start, End time.Time
	Code       string
}

// maxSpans bounds each action's timeline; later requests are not kept.
const maxSpans = 1 << 16

// Timeline returns the requests of action in the order they ended, at
// most the first 65,536: what a benchmark measures API time by.
func (s *Server) Timeline(action string) []Span {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.timeline[action])
}

func (s *Server) recordSpan(action string, sp Span) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.timeline[action]) < maxSpans {
		s.timeline[action] = append(s.timeline[action], sp)
	}
}

func (s *Server) countError(action, code string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.errs[action+"/"+code]++
}

// ---- instance states ----

// settle moves an instance through the timed transitions. Callers hold mu.
func (s *Server) settle(in *instance, now time.Time) {
	next := func(after time.Duration, to int) {
		if at := in.since.Add(after); !now.Before(at) {
			in.state, in.since = to, at
		}
	}
	switch in.state {
	case pending:
		next(s.opts.BootDelay, running)
	case stopping:
		next(s.opts.StopDelay, stopped)
	case shuttingDown:
		next(s.opts.StopDelay, terminated)
	}
}

func (s *Server) setState(in *instance, to int, now time.Time) {
	in.state, in.since = to, now
	switch to {
	case stopping, shuttingDown:
		in.reason = "User initiated (" + now.UTC().Format("2006-01-02 15:04:05 MST") + ")"
	case pending:
		in.reason, in.launched = "", now
	}
}

// ordered settles every instance, forgets those terminated longer than
// TerminatedTTL, and returns the rest in launch order. The slice is the
// region's own, valid while the caller holds mu; it is kept in order as
// instances launch so that a listing of 10,000 does not sort them for each
// page.
func (s *Server) ordered(rg *region, now time.Time) []*instance {
	kept := rg.launched[:0]
	for _, in := range rg.launched {
		if in.forgotten {
			continue
		}
		s.settle(in, now)
		if in.state == terminated && now.Sub(in.since) > s.opts.TerminatedTTL {
			delete(rg.instances, in.id)
			in.forgotten = true
			continue
		}
		kept = append(kept, in)
	}
	clear(rg.launched[len(kept):])
	rg.launched = kept
	return kept
}

func (s *Server) hidden(in *instance, now time.Time) bool {
	return now.Sub(in.created) < s.hideFor
}

// active counts pending and running instances. Callers hold mu.
func (s *Server) active(rg *region, now time.Time) int {
	n := 0
	for _, in := range s.ordered(rg, now) {
		if in.state == pending || in.state == running {
			n++
		}
	}
	return n
}

// lookup finds instances by id. Like EC2, one unknown id fails the whole
// call and the error lists every unknown one. Callers hold mu.
func (s *Server) lookup(rg *region, ids []string, now time.Time) ([]*instance, error) {
	s.ordered(rg, now) // settle and forget expired ones
	var found []*instance
	var missing []string
	for _, id := range ids {
		in, ok := rg.instances[id]
		if !ok || s.hidden(in, now) {
			if !slices.Contains(missing, id) {
				missing = append(missing, id)
			}
			continue
		}
		if !slices.Contains(found, in) {
			found = append(found, in)
		}
	}
	switch len(missing) {
	case 0:
		return found, nil
	case 1:
		return nil, errorf("InvalidInstanceID.NotFound", "The instance ID '%s' does not exist", missing[0])
	}
	return nil, errorf("InvalidInstanceID.NotFound", "The instance IDs '%s' do not exist", strings.Join(missing, ", "))
}

// ---- RunInstances ----

func (s *Server) runInstances(ctx context.Context, rg *region, q query) (response, error) {
	// An image the backend was still making may be ready now.
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	req, err := s.parseRun(rg, q)
	if err != nil {
		return nil, err
	}
	s.launchMu.Lock()
	defer s.launchMu.Unlock()

	s.mu.Lock()
	if rec, ok := rg.tokens[req.token]; ok {
		defer s.mu.Unlock()
		if rec.fingerprint != req.fingerprint {
			return nil, errorf("IdempotentParameterMismatch", "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).")
		}
		return s.reservation(rg, rec.reservation, rec.instances, time.Now(), true), nil
	}
	s.mu.Unlock()
	if err := s.checkCapacity(rg, req.typ, req.zone, req.market); err != nil {
		return nil, err
	}
	maxCount, err := s.capacityFor(rg, req)
	if err != nil {
		return nil, err
	}
	n, err := s.quota(rg, req.minCount, maxCount)
	if err != nil {
		return nil, err
	}
	refund, err := s.chargeResource("RunInstances", n)
	if err != nil {
		return nil, err
	}

	type placed struct{ id, ip, publicIP string }
	var got []placed
	if b := s.opts.Backend; b != nil {
		token := req.token
		if token == "" {
			token = newHexID("ec2test-")
		}
		spec := cloud.LaunchSpec{
			Image: s.backendImage(req.image), InstanceTypes: []string{req.typ}, Zones: []string{req.zone},
			Subnets: []string{req.subnet}, UserData: req.userData, Tags: req.tags,
			ClientToken: token, SecurityGroups: req.groups, KeyName: req.keyName,
			InstanceProfile: req.profile, RootVolumeGB: req.rootGB,
			MetadataHTTPTokens: req.httpTokens, MetadataHopLimit: req.hopLimit,
		}
		if req.market == marketSpot {
			spec.Spot = "only"
		}
		insts, err := b.Launch(ctx, spec, n)
		refund(n - len(insts))
		if len(insts) == 0 {
			if err == nil {
				err = errors.New("backend launched nothing")
			}
			return nil, errorf("InternalError", "An internal error has occurred: backend: %v", err)
		}
		if err != nil {
			s.log.Warn("ec2test: backend launched fewer instances", "want", n, "got", len(insts), "err", err)
		}
		for _, bi := range insts {
			got = append(got, placed{bi.ID, bi.PrivateIP, bi.PublicIP})
		}
	} else {
		for range n {
			got = append(got, placed{})
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	res := newHexID("r-")
	var launched []*instance
	for i, p := range got {
		in := &instance{
			id: p.id, ip: p.ip, publicIP: p.publicIP, reservation: res, image: req.image.ID, typ: req.typ,
			zone: req.zone, subnet: req.subnet, market: req.market, keyName: req.keyName,
			profile: req.profile, profileID: req.profileID, clientToken: req.token,
			volumeID: newHexID("vol-"), rootDevice: req.image.RootDevice,
			httpTokens: req.httpTokens, httpEndpoint: req.httpEndpoint, hopLimit: req.hopLimit,
			groups: req.groups, tags: maps.Clone(req.tags), volumeTags: maps.Clone(req.volumeTags),
			userData: req.userData, rootGB: req.rootGB, launchIndex: i, created: now,
		}
		// A backend's ids are the EC2 ids; without one, make them.
		for in.id == "" || s.opts.Backend == nil && rg.instances[in.id] != nil {
			in.id = newHexID("i-")
		}
		if in.ip == "" {
			in.ip = s.nextIP()
		}
		if in.market == marketSpot {
			in.spotRequest = newHexID("sir-")[:12]
		}
		s.setState(in, pending, now)
		s.seq++
		in.seq = s.seq
		if old := rg.instances[in.id]; old != nil {
			old.forgotten = true // a backend reused the id of one long gone
		}
		rg.instances[in.id] = in
		rg.launched = append(rg.launched, in)
		launched = append(launched, in)
	}
	if req.token != "" {
		rg.tokens[req.token] = &launchRecord{fingerprint: req.fingerprint, reservation: res, instances: launched}
		rg.launches[req.token]++
	}
	// A fresh launch answers pending, as on EC2, whatever the boot delay.
	resp := s.reservation(rg, res, launched, now, false)
	rg.peak = max(rg.peak, s.active(rg, now))
	return resp, nil
}

func (s *Server) reservation(rg *region, id string, insts []*instance, now time.Time, settle bool) *runInstancesResponse {
	r := &runInstancesResponse{reservationXML: reservationXML{ReservationID: id, OwnerID: s.opts.Account}}
	for _, in := range insts {
		if settle {
			s.settle(in, now)
		}
		r.Instances = append(r.Instances, s.instanceXML(rg, in, now))
	}
	return r
}

// nextIP hands out 10.0.0.0/8 addresses in order. Callers hold mu.
func (s *Server) nextIP() string {
	s.ipSeq++
	n := s.ipSeq + 3 // skip .1-.3, which AWS reserves in every subnet
	return fmt.Sprintf("10.%d.%d.%d", n>>16&255, n>>8&255, n&255)
}

// checkCapacity asks the test's capacity function, outside mu so that the
// function may call the Server.
func (s *Server) checkCapacity(rg *region, typ, zone, market string) error {
	s.mu.Lock()
	f := s.capacity
	s.mu.Unlock()
	if f == nil {
		return nil
	}
	if code := f(typ, zone, market); code != "" {
		return s.capacityError(rg, code, typ, zone, market)
	}
	return nil
}

// quota returns how many of between minCount and maxCount new instances
// fit under the quota. Callers hold launchMu, so nothing starts meanwhile.
func (s *Server) quota(rg *region, minCount, maxCount int) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.quotaCode == "" {
		return maxCount, nil
	}
	now := time.Now()
	free := s.quotaMax - s.active(rg, now)
	if free < minCount {
		if s.quotaCode == "VcpuLimitExceeded" {
			return 0, errorf(s.quotaCode, "You have requested more vCPU capacity than your current vCPU limit of %d allows for the instance bucket that the specified instance type belongs to. Please visit http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.", s.quotaMax)
		}
		return 0, errorf(s.quotaCode, "You have requested more instances (%d) than your current instance limit of %d allows for the specified instance type. Please visit http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.", s.active(rg, now)+minCount, s.quotaMax)
	}
	return min(maxCount, free), nil
}

// capacityError words code as EC2 does, so a client that logs the message
// shows what a real one would.
func (s *Server) capacityError(rg *region, code, typ, zone, market string) *apiError {
	others := strings.Join(slices.DeleteFunc(slices.Clone(rg.zones), func(z string) bool { return z == zone }), ", ")
	switch {
	case code == "InsufficientInstanceCapacity" && market == marketSpot:
		return errorf(code, "There is no Spot capacity available that matches your request.")
	case code == "InsufficientInstanceCapacity":
		return errorf(code, "We currently do not have sufficient %s capacity in the Availability Zone you requested (%s). Our system will be working on provisioning additional capacity. You can currently get %s capacity by not specifying an Availability Zone in your request or choosing %s.", typ, zone, typ, others)
	case code == "Unsupported":
		return errorf(code, "Your requested instance type (%s) is not supported in your requested Availability Zone (%s). Please retry your request by not specifying an Availability Zone or choosing %s.", typ, zone, others)
	case code == "SpotMaxPriceTooLow":
		return errorf(code, "Your Spot request price is lower than the minimum required Spot request fulfillment price.")
	case code == "MaxSpotInstanceCountExceeded":
		return errorf(code, "Max spot instance count exceeded")
	}
	return errorf(code, "ec2test: injected %s for %s in %s (%s)", code, typ, zone, market)
}

// ---- DescribeInstances ----

var instanceFilters = []string{"instance-id", "instance-state-name", "tag-key", "client-token",
	"instance-type", "availability-zone", "subnet-id", "image-id", "instance-lifecycle"}

func (s *Server) describeInstances(_ context.Context, rg *region, q query) (response, error) {
	ids := q.list("InstanceId")
	for _, id := range ids {
		if err := checkInstanceID(id); err != nil {
			return nil, err
		}
	}
	filters, err := q.filters()
	if err != nil {
		return nil, err
	}
	for _, f := range filters {
		if !strings.HasPrefix(f.name, "tag:") && !slices.Contains(instanceFilters, f.name) {
			return nil, errorf("InvalidParameterValue", "The filter '%s' is invalid", f.name)
		}
	}
	if err := s.refusal(filters); err != nil {
		return nil, err
	}
	limit, paged, err := q.int("MaxResults")
	if err != nil {
		return nil, err
	}
	switch {
	case paged && len(ids) > 0:
		return nil, errorf("InvalidParameterCombination", "The parameter instancesSet cannot be used with the parameter maxResults")
	case paged && (limit < 5 || limit > 1000):
		return nil, errorf("InvalidParameterValue", "Value ( %d ) for parameter maxResults is invalid. Expecting a value from 5 to 1000.", limit)
	case !paged:
		limit = math.MaxInt
	}
	var after uint64
	if tok := q.str("NextToken"); tok != "" {
		if after, err = decodeToken(tok); err != nil {
			return nil, err
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	var cands []*instance
	if len(ids) > 0 {
		if cands, err = s.lookup(rg, ids, now); err != nil {
			return nil, err
		}
	} else {
		for _, in := range s.ordered(rg, now) {
			if !s.hidden(in, now) {
				cands = append(cands, in)
			}
		}
	}
	resp := &describeInstancesResponse{}
	var page []*instance
	for _, in := range cands {
		if in.seq <= after || !in.matches(filters) {
			continue
		}
		if len(page) == limit {
			resp.NextToken = encodeToken(page[len(page)-1].seq)
			break
		}
		page = append(page, in)
	}
	// Instances of one reservation share an item, in launch order.
	byRes := map[string]int{}
	for _, in := range page {
		i, ok := byRes[in.reservation]
		if !ok {
			i = len(resp.Reservations)
			byRes[in.reservation] = i
			resp.Reservations = append(resp.Reservations, reservationXML{ReservationID: in.reservation, OwnerID: s.opts.Account})
		}
		resp.Reservations[i].Instances = append(resp.Reservations[i].Instances, s.instanceXML(rg, in, now))
	}
	return resp, nil
}

// matches is matchesAll(filters, in.filterValues), without making a list
// of one value for each tag filter: a listing checks every instance.
func (in *instance) matches(filters []filter) bool {
	for _, f := range filters {
		k, isTag := strings.CutPrefix(f.name, "tag:")
		if !isTag {
			if !matchesAll([]filter{f}, in.filterValues) {
				return false
			}
			continue
		}
		v, ok := in.tags[k]
		if !ok || !slices.ContainsFunc(f.values, func(want string) bool { return glob(want, v) }) {
			return false
		}
	}
	return true
}

// filterValues is what an instance offers for a filter name; ok is false
// when it has nothing for it (a tag it lacks).
func (in *instance) filterValues(name string) (vals []string, ok bool) {
	if k, isTag := strings.CutPrefix(name, "tag:"); isTag {
		v, ok := in.tags[k]
		return []string{v}, ok
	}
	switch name {
	case "instance-id":
		return []string{in.id}, true
	case "instance-state-name":
		return []string{stateNames[in.state]}, true
	case "tag-key":
		return slices.Collect(maps.Keys(in.tags)), true
	case "client-token":
		return []string{in.clientToken}, true
	case "instance-type":
		return []string{in.typ}, true
	case "availability-zone":
		return []string{in.zone}, true
	case "subnet-id":
		return []string{in.subnet}, true
	case "image-id":
		return []string{in.image}, true
	case "instance-lifecycle":
		return []string{"spot"}, in.market == marketSpot // on-demand instances have none
	}
	return nil, false
}

// matchesAll: every filter matches (AND); within one, any value (OR).
// Values may use EC2's * and ? wildcards.
func matchesAll(filters []filter, values func(string) ([]string, bool)) bool {
	for _, f := range filters {
		have, ok := values(f.name)
		if !ok {
			return false
		}
		hit := false
		for _, h := range have {
			for _, want := range f.values {
				if glob(want, h) {
					hit = true
				}
			}
		}
		if !hit {
			return false
		}
	}
	return true
}

// glob matches EC2 filter wildcards: * any run, ? one character, \ escapes.
func glob(pattern, s string) bool {
	for len(pattern) > 0 {
		switch pattern[0] {
		case '*':
			for i := len(s); i >= 0; i-- {
				if glob(pattern[1:], s[i:]) {
					return true
				}
			}
			return false
		case '?':
			if s == "" {
				return false
			}
			pattern, s = pattern[1:], s[1:]
			continue
		case '\\':
			if len(pattern) > 1 {
				pattern = pattern[1:]
			}
		}
		if s == "" || s[0] != pattern[0] {
			return false
		}
		pattern, s = pattern[1:], s[1:]
	}
	return s == ""
}

// Page tokens are opaque to clients; inside, the last launch sequence
// number shown, so a page never repeats or skips an instance that exists
// throughout.
const tokenPrefix = "ec2test-page:"

func encodeToken(seq uint64) string {
	return base64.StdEncoding.EncodeToString([]byte(tokenPrefix + strconv.FormatUint(seq, 10)))
}

func decodeToken(tok string) (uint64, error) {
	b, err := base64.StdEncoding.DecodeString(tok)
	if err == nil {
		if rest, ok := strings.CutPrefix(string(b), tokenPrefix); ok {
			if n, err := strconv.ParseUint(rest, 10, 64); err == nil {
				return n, nil
			}
		}
	}
	return 0, errorf("InvalidPaginationToken", "Invalid pagination token: %s", tok)
}

// ---- Terminate, Stop, Start ----

// change is one instance moving from one state to another.
type change struct {
	in       *instance
	from, to int
}

func (s *Server) terminateInstances(ctx context.Context, rg *region, q query) (response, error) {
	return s.transition(ctx, rg, q, func(in *instance) (int, error) {
		switch in.state {
		case terminated, shuttingDown:
			return in.state, nil
		}
		return shuttingDown, nil
	}, "TerminateInstances", cloud.Provider.Terminate)
}

func (s *Server) stopInstances(ctx context.Context, rg *region, q query) (response, error) {
	if _, err := q.bool("Force"); err != nil {
		return nil, err
	}
	return s.transition(ctx, rg, q, func(in *instance) (int, error) {
		switch {
		case in.state == stopped || in.state == stopping:
			return in.state, nil
		case in.market == marketSpot:
			return 0, errorf("UnsupportedOperation", "You can't stop the Spot Instance '%s' because it is associated with a one-time Spot Instance request. You can only stop Spot Instances associated with persistent Spot Instance requests.", in.id)
		case in.state != running:
			return 0, errorf("IncorrectInstanceState", "This instance '%s' is not in a state from which it can be stopped.", in.id)
		}
		return stopping, nil
	}, "StopInstances", cloud.Provider.Stop)
}

func (s *Server) startInstances(ctx context.Context, rg *region, q query) (response, error) {
	// Starting counts against capacity and quota, as a launch does.
	s.launchMu.Lock()
	defer s.launchMu.Unlock()
	return s.transition(ctx, rg, q, func(in *instance) (int, error) {
		switch in.state {
		case pending, running:
			return in.state, nil
		case stopped:
			return pending, nil
		}
		return 0, errorf("IncorrectInstanceState", "The instance '%s' is not in a state from which it can be started.", in.id)
	}, "StartInstances", cloud.Provider.Start)
}

// transition runs Terminate-, Stop- or StartInstances: decide every
// instance's next state (one refusal fails the whole call, as on EC2), tell
// the backend outside the lock, then record what the backend did.
func (s *Server) transition(ctx context.Context, rg *region, q query, next func(*instance) (int, error),
	action string, backend func(cloud.Provider, context.Context, []string) ([]string, error)) (response, error) {
	ids, err := q.instanceIDs()
	if err != nil {
		return nil, err
	}
	changes, err := s.plan(rg, ids, next)
	if err != nil {
		return nil, err
	}
	var moving []string
	starting := 0
	for _, c := range changes {
		if c.to == c.from {
			continue
		}
		moving = append(moving, c.in.id)
		if c.to == pending {
			if err := s.checkCapacity(rg, c.in.typ, c.in.zone, c.in.market); err != nil {
				return nil, err
			}
			starting++
		}
	}
	if starting > 0 {
		if _, err := s.quota(rg, starting, starting); err != nil {
			return nil, err
		}
	}
	refund, err := s.chargeResource(action, len(moving))
	if err != nil {
		return nil, err
	}
	done := moving
	var backendErr error
	if b := s.opts.Backend; b != nil && len(moving) > 0 {
		done, backendErr = backend(b, ctx, moving)
		refund(len(moving) - len(done))
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	resp := &stateChangesResponse{}
	for _, c := range changes {
		// A concurrent terminate wins over this call.
		if c.to != c.from && slices.Contains(done, c.in.id) && c.in.state != shuttingDown && c.in.state != terminated {
			s.setState(c.in, c.to, now)
		}
		resp.Instances = append(resp.Instances, stateChangeXML{
			InstanceID: c.in.id, PreviousState: stateOf(c.from), CurrentState: stateOf(c.in.state),
		})
	}
	rg.peak = max(rg.peak, s.active(rg, now))
	if backendErr != nil {
		return nil, errorf("InternalError", "An internal error has occurred: backend: %v", backendErr)
	}
	return resp, nil
}

// plan finds the instances and decides where each goes.
func (s *Server) plan(rg *region, ids []string, next func(*instance) (int, error)) ([]change, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	insts, err := s.lookup(rg, ids, time.Now())
	if err != nil {
		return nil, err
	}
	changes := make([]change, len(insts))
	for i, in := range insts {
		to, err := next(in)
		if err != nil {
			return nil, err
		}
		changes[i] = change{in, in.state, to}
	}
	return changes, nil
}

// ---- console, attributes, tags ----

func (s *Server) getConsoleOutput(ctx context.Context, rg *region, q query) (response, error) {
	id := q.str("InstanceId")
	if id == "" {
		return nil, errorf("MissingParameter", "The request must contain the parameter InstanceId")
	}
	if err := checkInstanceID(id); err != nil {
		return nil, err
	}
	if _, err := q.bool("Latest"); err != nil {
		return nil, err
	}
	s.mu.Lock()
	insts, err := s.lookup(rg, []string{id}, time.Now())
	var in instance
	if err == nil {
		in = *insts[0]
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var out []byte
	switch {
	case s.opts.Backend != nil:
		out, err = s.opts.Backend.ConsoleOutput(ctx, id)
		if err != nil && !errors.Is(err, cloud.ErrNotFound) {
			return nil, errorf("InternalError", "An internal error has occurred: backend: %v", err)
		}
	case in.state == running:
		out = fmt.Appendf(nil, "ec2test: %s (%s) booted from %s\n", in.id, in.typ, in.image)
	}
	if len(out) > consoleTail {
		out = out[len(out)-consoleTail:]
	}
	r := &consoleOutputResponse{InstanceID: id, Timestamp: ec2Time(time.Now())}
	if len(out) > 0 {
		r.Output = base64Of(out)
	}
	return r, nil
}

func (s *Server) describeInstanceAttribute(_ context.Context, rg *region, q query) (response, error) {
	id, attr := q.str("InstanceId"), q.str("Attribute")
	switch {
	case id == "":
		return nil, errorf("MissingParameter", "The request must contain the parameter InstanceId")
	case attr == "":
		return nil, errorf("MissingParameter", "The request must contain the parameter Attribute")
	}
	if err := checkInstanceID(id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	insts, err := s.lookup(rg, []string{id}, time.Now())
	if err != nil {
		return nil, err
	}
	in := insts[0]
	r := &instanceAttributeResponse{InstanceID: id}
	switch attr {
	case "userData":
		r.UserData = &attrValueXML{}
		if len(in.userData) > 0 {
			r.UserData.Value = base64Of(in.userData)
		}
	case "instanceType":
		r.InstanceType = &attrValueXML{Value: in.typ}
	default:
		return nil, errorf("InvalidParameterValue", "Value (%s) for parameter attribute is invalid. ec2test knows userData and instanceType.", attr)
	}
	return r, nil
}

func (s *Server) createTags(_ context.Context, rg *region, q query) (response, error) {
	ids := q.list("ResourceId")
	if len(ids) == 0 {
		return nil, errorf("MissingParameter", "The request must contain the parameter ResourceId")
	}
	tags, err := q.tags("Tag")
	if err != nil {
		return nil, err
	}
	if len(tags) == 0 {
		return nil, errorf("MissingParameter", "The request must contain the parameter Tag")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	targets, err := s.tagTargets(rg, ids, time.Now())
	if err != nil {
		return nil, err
	}
	for _, t := range targets {
		merged := map[string]string{}
		maps.Copy(merged, *t)
		maps.Copy(merged, tags)
		if len(merged) > 50 {
			return nil, errorf("TagLimitExceeded", "The maximum number of tags (50) per resource has been exceeded.")
		}
	}
	for _, t := range targets {
		if *t == nil {
			*t = map[string]string{}
		}
		maps.Copy(*t, tags)
	}
	return &returnResponse{Return: true}, nil
}

// deleteTags removes Tag.N.Key from each resource; with Tag.N.Value, only
// where the tag has that value; with no Tag at all, every tag.
func (s *Server) deleteTags(_ context.Context, rg *region, q query) (response, error) {
	ids := q.list("ResourceId")
	if len(ids) == 0 {
		return nil, errorf("MissingParameter", "The request must contain the parameter ResourceId")
	}
	type del struct {
		key, value string
		anyValue   bool
	}
	var dels []del
	for _, i := range q.indexes("Tag") {
		p := "Tag." + strconv.Itoa(i)
		k := q.str(p + ".Key")
		if k == "" {
			return nil, errorf("InvalidParameterValue", "Tag key must not be empty (%s.Key).", p)
		}
		if strings.HasPrefix(strings.ToLower(k), "aws:") {
			return nil, errorf("InvalidParameterValue", "Tag keys starting with 'aws:' are reserved for internal use")
		}
		dels = append(dels, del{k, q.str(p + ".Value"), !q.has(p + ".Value")})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	targets, err := s.tagTargets(rg, ids, time.Now())
	if err != nil {
		return nil, err
	}
	for _, t := range targets {
		if len(dels) == 0 {
			*t = nil
		}
		for _, d := range dels {
			if v, ok := (*t)[d.key]; ok && (d.anyValue || v == d.value) {
				delete(*t, d.key)
			}
		}
	}
	return &returnResponse{Return: true}, nil
}

// tagTargets finds the tag maps of the resources named by ids, in the
// region: instances, volumes (instances' root volumes included),
// snapshots, images and key pairs. One unknown id fails the whole call.
// Callers hold mu.
func (s *Server) tagTargets(rg *region, ids []string, now time.Time) ([]*map[string]string, error) {
	var targets []*map[string]string
	var instIDs []string
	for _, id := range ids {
		prefix, _, _ := strings.Cut(id, "-")
		switch prefix {
		case "i":
			if err := checkInstanceID(id); err != nil {
				return nil, err
			}
			instIDs = append(instIDs, id)
		case "vol":
			if v := rg.volumes[id]; v != nil {
				targets = append(targets, &v.tags)
			} else if in := s.rootVolumeOf(rg, id, now); in != nil {
				targets = append(targets, &in.volumeTags)
			} else {
				return nil, errorf("InvalidVolume.NotFound", "The volume '%s' does not exist.", id)
			}
		case "snap":
			sn := rg.snapshots[id]
			if sn == nil {
				return nil, errorf("InvalidSnapshot.NotFound", "The snapshot '%s' does not exist.", id)
			}
			targets = append(targets, &sn.tags)
		case "ami":
			im := s.findImage(rg, id, now)
			if im == nil {
				return nil, errorf("InvalidAMIID.NotFound", "The image id '[%s]' does not exist", id)
			}
			targets = append(targets, &im.Tags)
		case "key":
			kp := rg.keyPairByID(id)
			if kp == nil {
				return nil, errorf("InvalidKeyPair.NotFound", "The key pair '%s' does not exist", id)
			}
			targets = append(targets, &kp.tags)
		default:
			return nil, errorf("InvalidID", "The ID '%s' is not valid", id)
		}
	}
	insts, err := s.lookup(rg, instIDs, now)
	if err != nil {
		return nil, err
	}
	for _, in := range insts {
		targets = append(targets, &in.tags)
	}
	return targets, nil
}

// rootVolumeOf finds the instance whose root volume id is, ignoring
// hidden ones. Callers hold mu.
func (s *Server) rootVolumeOf(rg *region, id string, now time.Time) *instance {
	for _, in := range s.ordered(rg, now) {
		if in.volumeID == id && !s.hidden(in, now) && in.state != terminated {
			return in
		}
	}
	return nil
}

// ---- zones ----

func (s *Server) describeAvailabilityZones(_ context.Context, rg *region, q query) (response, error) {
	if _, err := q.bool("AllAvailabilityZones"); err != nil {
		return nil, err
	}
	names := q.list("ZoneName")
	for _, n := range names {
		if !slices.Contains(rg.zones, n) {
			return nil, errorf("InvalidParameterValue", "The zone '%s' does not exist", n)
		}
	}
	filters, err := q.filters()
	if err != nil {
		return nil, err
	}
	resp := &availabilityZonesResponse{}
	for i, z := range rg.zones {
		x := zoneXML{
			ZoneName: z, ZoneState: "available", RegionName: rg.name,
			ZoneID: zoneIDPrefix(rg.name) + "-az" + strconv.Itoa(i+1), OptInStatus: "opt-in-not-required",
			GroupName: rg.name, NetworkBorderGroup: rg.name, ZoneType: "availability-zone",
		}
		values := func(name string) ([]string, bool) {
			switch name {
			case "zone-name":
				return []string{x.ZoneName}, true
			case "zone-id":
				return []string{x.ZoneID}, true
			case "state":
				return []string{x.ZoneState}, true
			case "region-name":
				return []string{x.RegionName}, true
			}
			return nil, false
		}
		if (len(names) == 0 || slices.Contains(names, z)) && matchesAll(filters, values) {
			resp.Zones = append(resp.Zones, x)
		}
	}
	return resp, nil
}

// zoneIDPrefix abbreviates a region as zone ids do: us-east-1 → use1.
func zoneIDPrefix(region string) string {
	parts := strings.Split(region, "-")
	if len(parts) < 3 {
		return region
	}
	return parts[0] + parts[1][:1] + parts[len(parts)-1]
}

func newHexID(prefix string) string { return prefix + strings.ReplaceAll(newRequestID(), "-", "")[:17] }
