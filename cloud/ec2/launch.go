package ec2

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/hangar-ci/hangar/cloud"
)

// offering is one way to launch: an instance type, where, and on which
// market.
type offering struct {
	Type   string
	Subnet string // set when the pool names subnets
	Zone   string // set when the pool names zones and no subnets
	Spot   bool
}

func (o offering) market() string {
	if o.Spot {
		return "spot"
	}
	return "on-demand"
}

func (o offering) String() string {
	where := cmp.Or(o.Subnet, o.Zone, "any zone")
	return fmt.Sprintf("%s in %s (%s)", o.Type, where, o.market())
}

// offerings lists what to try, best first: each instance type in order,
// within it each subnet (or zone) in order, within that spot before
// on-demand when spot is preferred.
func offerings(spec cloud.LaunchSpec) ([]offering, error) {
	if len(spec.InstanceTypes) == 0 {
		return nil, errors.New("no instance types given")
	}
	var markets []bool
	switch spec.Spot {
	case "", "off":
		markets = []bool{false}
	case "prefer":
		markets = []bool{true, false}
	case "only":
		markets = []bool{true}
	default:
		return nil, fmt.Errorf("spot %q: want off, prefer or only", spec.Spot)
	}
	places := []offering{{}}
	switch {
	case len(spec.Subnets) > 0:
		places = places[:0]
		for _, s := range spec.Subnets {
			places = append(places, offering{Subnet: s})
		}
	case len(spec.Zones) > 0:
		places = places[:0]
		for _, z := range spec.Zones {
			places = append(places, offering{Zone: z})
		}
	}
	var out []offering
	for _, t := range spec.InstanceTypes {
		for _, pl := range places {
			for _, spot := range markets {
				out = append(out, offering{Type: t, Subnet: pl.Subnet, Zone: pl.Zone, Spot: spot})
			}
		}
	}
	return out, nil
}

// clientToken is the ClientToken EC2 gets for one offering of a launch.
// Each offering needs its own: EC2 refuses a token reused with other
// parameters (IdempotentParameterMismatch). Deriving it from the launch's
// token keeps it the same across retries and restarts, so that a launch
// that did happen is found again instead of repeated. EC2 allows 64 ASCII
// characters; this is 55.
func clientToken(launchToken string, o offering) string {
	h := sha256.Sum256([]byte(strings.Join([]string{launchToken, o.Type, o.Subnet, o.Zone, o.market()}, "\x00")))
	return "hangar-" + hex.EncodeToString(h[:24])
}

// offeringMemory remembers offerings that failed for lack of capacity, so
// that for a while launches go straight to the next one instead of
// knocking on a door that just stayed shut.
type offeringMemory struct {
	ttl time.Duration
	now func() time.Time

	mu    sync.Mutex
	until map[offering]time.Time
}

func newOfferingMemory(ttl time.Duration, now func() time.Time) *offeringMemory {
	return &offeringMemory{ttl: ttl, now: now, until: map[offering]time.Time{}}
}

func (m *offeringMemory) fail(o offering) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.until[o] = m.now().Add(m.ttl)
}

// skip reports whether o failed within the memory's time.
func (m *offeringMemory) skip(o offering) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	until, ok := m.until[o]
	if ok && !m.now().Before(until) {
		delete(m.until, o)
		return false
	}
	return ok
}

// launchRounds bounds how often a launch whose outcome is unknown (lost
// response, EC2 internal error, throttling the SDK's retries did not ride
// out) is sent again with the same offering and token.
const launchRounds = 4

// Launch starts n instances, falling back through the spec's offerings on
// capacity errors. Each offering gets its own client token derived from
// spec.ClientToken, and a launch moves on to the next offering only when
// EC2 has said no to this one: after an unknown outcome it asks again with
// the same token, so that at most one offering can ever have launched.
func (p *Provider) Launch(ctx context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	if spec.ClientToken == "" {
		return nil, errors.New("launching ec2 instances: a client token is required")
	}
	if n < 1 {
		return nil, fmt.Errorf("launching ec2 instances: count %d is not positive", n)
	}
	offers, err := offerings(spec)
	if err != nil {
		return nil, fmt.Errorf("launching ec2 instances: %w", err)
	}
	img, err := p.images.resolve(ctx, spec.Image, spec.RootVolumeGB > 0)
	if err != nil {
		return nil, fmt.Errorf("launching ec2 instances: %w", err)
	}
	if spec.RootVolumeGB > 0 && img.RootDevice == "" {
		return nil, fmt.Errorf("launching ec2 instances: image %s has no root device to resize", img.ID)
	}
	if len(offers) > 1 {
		// An earlier call (before a crash, or one whose answer was lost)
		// may have launched on an offering this call would not reach
		// first. With one offering, its token alone finds such a launch.
		found, err := p.findEarlier(ctx, spec, offers)
		if err != nil {
			return nil, wrapErr("looking for an earlier launch", err)
		}
		if len(found) > 0 {
			return p.replay(ctx, spec, img, offers, found, n)
		}
	}

	capErr := &capacityError{n: n, ttl: p.offerings.ttl}
	for _, o := range offers {
		// An offering this launch may already have launched on must be
		// asked again, however full it looked to others since: EC2 may
		// not list that instance yet, so only its token can find it.
		if _, unsure := p.unsure.age(clientToken(spec.ClientToken, o)); !unsure && p.offerings.skip(o) {
			capErr.skipped++
			continue
		}
		insts, err := p.runOffering(ctx, spec, img, o, n)
		if err == nil {
			return insts, nil
		}
		if len(insts) > 0 {
			// Started short: the offering ran out, so the next launch
			// starts on the next one.
			p.log.Info("offering started fewer instances than asked; trying the next offering first for a while", "offering", o.String(), "asked", n, "started", len(insts))
			p.offerings.fail(o)
			return insts, err
		}
		if !errors.Is(err, cloud.ErrCapacity) {
			return nil, err
		}
		p.log.Info("no capacity; trying the next offering", "offering", o.String(), "code", errorCode(err))
		p.offerings.fail(o)
		capErr.tried = append(capErr.tried, o)
		capErr.errs = append(capErr.errs, err)
	}
	return nil, capErr
}

// capacityError says that every offering lacked capacity, now or lately.
// Its message names each offering tried with EC2's code; the full errors,
// EC2's messages and request ids included, are in the chain.
type capacityError struct {
	n       int
	tried   []offering
	errs    []error
	skipped int
	ttl     time.Duration
}

func (e *capacityError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "launching %d ec2 instance(s): no offering has capacity", e.n)
	if e.skipped > 0 {
		fmt.Fprintf(&b, " (%d skipped after failing within %s)", e.skipped, e.ttl)
	}
	for i, o := range e.tried {
		fmt.Fprintf(&b, "; %s: %s", o, errorCode(e.errs[i]))
	}
	return b.String()
}

func (e *capacityError) Unwrap() []error { return append([]error{cloud.ErrCapacity}, e.errs...) }

// shortError says that a launch started fewer instances than asked: EC2
// had no more of the offering (MinCount is 1). It is a capacity error, so
// that the pool launches the rest on another offering.
type shortError struct {
	asked, started int
	o              offering
}

func (e *shortError) Error() string {
	return fmt.Sprintf("launching %d %s: EC2 started only %d (no capacity for the rest)", e.asked, e.o, e.started)
}

func (e *shortError) Unwrap() error { return cloud.ErrCapacity }

// runOffering launches on one offering, asking again with the same token
// while the outcome is unknown. When it gives up not knowing, it remembers
// the token for Launch.
func (p *Provider) runOffering(ctx context.Context, spec cloud.LaunchSpec, img image, o offering, n int) (_ []cloud.Instance, err error) {
	in := runInput(spec, img, o, n)
	doing := fmt.Sprintf("launching %d %s", n, o)
	defer func() {
		if uncertain(err) {
			p.unsure.add(aws.ToString(in.ClientToken))
		}
	}()
	for round := 1; ; round++ {
		out, err := p.api.RunInstances(ctx, in)
		if err == nil {
			insts := p.launched(out.Instances, spec.Tags)
			if len(insts) < n {
				return insts, &shortError{asked: n, started: len(insts), o: o}
			}
			return insts, nil
		}
		if errorCode(err) == "IdempotentParameterMismatch" {
			// This token launched before with other parameters: a
			// restarted pool retrying an intent renders new user-data.
			// The instance of that launch is the one this intent gets.
			if found, ferr := p.findEarlier(ctx, spec, []offering{o}); ferr == nil {
				var mine []cloud.Instance
				for _, f := range found {
					if tok := aws.ToString(f.ClientToken); tok == aws.ToString(in.ClientToken) || tok == "" && launchedOn(f, o) {
						mine = append(mine, toInstance(f))
					}
				}
				if len(mine) > 0 {
					return mine, nil
				}
			}
		}
		if !uncertain(err) || round >= launchRounds || ctx.Err() != nil {
			return nil, wrapErr(doing, err)
		}
		p.log.Warn("launch outcome unknown; asking again with the same client token", "offering", o.String(), "round", round, "err", err)
		wait := p.clock.NewTimer(p.backoff(round))
		select {
		case <-wait.C():
		case <-ctx.Done():
			wait.Stop()
			return nil, wrapErr(doing, fmt.Errorf("%w; gave up: %w", err, ctx.Err()))
		}
	}
}

// launched translates what RunInstances returned and remembers the ids
// for the consistency window.
func (p *Provider) launched(insts []types.Instance, tags map[string]string) []cloud.Instance {
	out := make([]cloud.Instance, 0, len(insts))
	for _, in := range insts {
		inst := toInstance(in)
		if inst.Tags == nil {
			// Not every cloud echoes the tags it was launched with.
			inst.Tags = maps.Clone(tags)
		}
		out = append(out, inst)
		p.recent.add(inst.ID)
	}
	return out
}

// maxFilterValues is the most values EC2 takes in one filter.
const maxFilterValues = 200

// findEarlier returns the instances an earlier attempt of this launch
// started on any of offers: by the hangar:intent tag first, which every
// EC2-compatible cloud we know serves and which finds every offering in
// one call, then by the offerings' client tokens. A filter the cloud does
// not serve is skipped (filters.go); with neither, nothing is found.
func (p *Provider) findEarlier(ctx context.Context, spec cloud.LaunchSpec, offers []offering) ([]types.Instance, error) {
	if intent := spec.Tags[cloud.TagIntent]; intent != "" {
		found, _, err := p.earlierByTag(ctx, intent)
		if err != nil {
			return nil, err
		}
		if len(found) > 0 {
			return found, nil
		}
	}
	return p.earlierByToken(ctx, spec.ClientToken, offers)
}

// earlierByTag returns the instances tagged with the launch's intent.
func (p *Provider) earlierByTag(ctx context.Context, intent string) (_ []types.Instance, refused bool, _ error) {
	in := &ec2.DescribeInstancesInput{
		Filters: []types.Filter{
			{Name: aws.String("instance-state-name"), Values: allStates},
			{Name: aws.String("tag:" + cloud.TagIntent), Values: []string{literal(intent)}},
		},
		MaxResults: aws.Int32(pageSize),
	}
	var out []types.Instance
	for {
		page, refused, err := p.describeWith(ctx, p.tagFilter, in)
		if err != nil || refused {
			return nil, refused, err
		}
		for _, r := range page.Reservations {
			for _, inst := range r.Instances {
				// A cloud that ignores the filter must not pass strangers
				// off as this launch's instances.
				if tagValue(inst.Tags, cloud.TagIntent) == intent {
					out = append(out, inst)
				}
			}
		}
		next := aws.ToString(page.NextToken)
		if next == "" || next == aws.ToString(in.NextToken) {
			return out, false, nil
		}
		in.NextToken = aws.String(next)
	}
}

// earlierByToken returns the instances launched under any of the launch's
// offering tokens.
func (p *Provider) earlierByToken(ctx context.Context, launchToken string, offers []offering) ([]types.Instance, error) {
	tokens := make([]string, len(offers))
	for i, o := range offers {
		tokens[i] = clientToken(launchToken, o)
	}
	var out []types.Instance
	for chunk := range slices.Chunk(tokens, maxFilterValues) {
		in := &ec2.DescribeInstancesInput{
			Filters:    []types.Filter{{Name: aws.String("client-token"), Values: chunk}},
			MaxResults: aws.Int32(pageSize),
		}
		for {
			page, refused, err := p.describeWith(ctx, p.tokenFilter, in)
			if refused {
				// Launching anyway keeps the pool working; a launch
				// retried after a crash may then start a second
				// instance, which the pool's reconcile ends as an orphan.
				return out, nil
			}
			if err != nil {
				return nil, err
			}
			for _, r := range page.Reservations {
				for _, inst := range r.Instances {
					if slices.Contains(chunk, aws.ToString(inst.ClientToken)) {
						out = append(out, inst)
					}
				}
			}
			next := aws.ToString(page.NextToken)
			if next == "" || next == aws.ToString(in.NextToken) {
				break
			}
			in.NextToken = aws.String(next)
		}
	}
	return out, nil
}

func tagValue(tags []types.Tag, key string) string {
	for _, t := range tags {
		if aws.ToString(t.Key) == key {
			return aws.ToString(t.Value)
		}
	}
	return ""
}

// offeringOf finds the offering found instances were launched on: by
// their client token, or, on a cloud that does not echo tokens, by type,
// place and market. ok is false for instances of another token.
func offeringOf(launchToken string, offers []offering, found []types.Instance) (offering, bool) {
	for _, in := range found {
		tok := aws.ToString(in.ClientToken)
		for _, o := range offers {
			if tok != "" && tok == clientToken(launchToken, o) {
				return o, true
			}
			if tok == "" && launchedOn(in, o) {
				return o, true
			}
		}
	}
	return offering{}, false
}

// launchedOn reports whether in has offering o's type, place and market.
func launchedOn(in types.Instance, o offering) bool {
	zone := ""
	if in.Placement != nil {
		zone = aws.ToString(in.Placement.AvailabilityZone)
	}
	spot := in.InstanceLifecycle == types.InstanceLifecycleTypeSpot
	return string(in.InstanceType) == o.Type && spot == o.Spot &&
		(o.Subnet == "" || aws.ToString(in.SubnetId) == o.Subnet) &&
		(o.Zone == "" || zone == o.Zone)
}

// replay answers a launch an earlier attempt made: it sends that
// offering's RunInstances again with its token, which EC2 answers with
// the launch's full list even while listings lag behind it. When the
// offering is not known or the replay fails, what the lookup found is
// the answer.
func (p *Provider) replay(ctx context.Context, spec cloud.LaunchSpec, img image, offers []offering, found []types.Instance, n int) ([]cloud.Instance, error) {
	if o, ok := offeringOf(spec.ClientToken, offers, found); ok {
		insts, err := p.runOffering(ctx, spec, img, o, n)
		if len(insts) > 0 {
			return insts, err
		}
		p.log.Info("replaying an earlier launch failed; answering with what the lookup found", "offering", o.String(), "err", err)
	}
	out := make([]cloud.Instance, len(found))
	for i, in := range found {
		out[i] = toInstance(in)
	}
	return out, nil
}

// filterRefused reports whether err is a cloud refusing a filter.
func filterRefused(err error) bool {
	switch errorCode(err) {
	case "InvalidParameterValue", "InvalidFilter", "InvalidParameter", "UnknownParameter", "InvalidParameterCombination":
		return true
	}
	return false
}

// runInput builds the RunInstances request for one offering.
func runInput(spec cloud.LaunchSpec, img image, o offering, n int) *ec2.RunInstancesInput {
	in := &ec2.RunInstancesInput{
		ImageId:      aws.String(img.ID),
		InstanceType: types.InstanceType(o.Type),
		// As many as the offering has, at least one: a batch that starts
		// short is still a start, and the pool launches the rest
		// elsewhere (see shortError).
		MinCount:    aws.Int32(1),
		MaxCount:    aws.Int32(int32(n)),
		ClientToken: aws.String(clientToken(spec.ClientToken, o)),
	}
	if len(spec.UserData) > 0 {
		in.UserData = aws.String(base64.StdEncoding.EncodeToString(spec.UserData))
	}
	if len(spec.Tags) > 0 {
		var tags []types.Tag
		for _, k := range slices.Sorted(maps.Keys(spec.Tags)) {
			tags = append(tags, types.Tag{Key: aws.String(k), Value: aws.String(spec.Tags[k])})
		}
		// Volumes carry the tags too, so that a volume left behind can be
		// traced to its pool.
		in.TagSpecifications = []types.TagSpecification{
			{ResourceType: types.ResourceTypeInstance, Tags: tags},
			{ResourceType: types.ResourceTypeVolume, Tags: tags},
		}
	}
	if spec.KeyName != "" {
		in.KeyName = aws.String(spec.KeyName)
	}
	for _, g := range spec.SecurityGroups {
		// Ids work everywhere; names only in a default VPC or on clouds
		// without VPCs, such as older Eucalyptus.
		if strings.HasPrefix(g, "sg-") {
			in.SecurityGroupIds = append(in.SecurityGroupIds, g)
		} else {
			in.SecurityGroups = append(in.SecurityGroups, g)
		}
	}
	if p := spec.InstanceProfile; p != "" {
		if strings.HasPrefix(p, "arn:") {
			in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Arn: aws.String(p)}
		} else {
			in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Name: aws.String(p)}
		}
	}
	in.MetadataOptions = metadataOptions(spec)
	switch {
	case o.Subnet != "":
		in.SubnetId = aws.String(o.Subnet)
	case o.Zone != "":
		in.Placement = &types.Placement{AvailabilityZone: aws.String(o.Zone)}
	}
	if spec.RootVolumeGB > 0 {
		in.BlockDeviceMappings = []types.BlockDeviceMapping{{
			DeviceName: aws.String(img.RootDevice),
			Ebs: &types.EbsBlockDevice{
				VolumeSize: aws.Int32(int32(spec.RootVolumeGB)),
				// An image may keep its root volume after termination;
				// a pool's never should.
				DeleteOnTermination: aws.Bool(true),
			},
		}}
	}
	if o.Spot {
		in.InstanceMarketOptions = &types.InstanceMarketOptionsRequest{
			MarketType: types.MarketTypeSpot,
			SpotOptions: &types.SpotMarketOptions{
				SpotInstanceType:             types.SpotInstanceTypeOneTime,
				InstanceInterruptionBehavior: types.InstanceInterruptionBehaviorTerminate,
			},
		}
	}
	return in
}

// metadataOptions keeps IMDSv2 required with hop limit 1 unless the pool
// says otherwise. "optional" with hop limit 1 is exactly EC2's default, so
// then nothing is sent: clouds that lack metadata options (some
// EC2-compatible ones reject the parameter) work that way.
func metadataOptions(spec cloud.LaunchSpec) *types.InstanceMetadataOptionsRequest {
	tokens := cmp.Or(spec.MetadataHTTPTokens, "required")
	hops := max(spec.MetadataHopLimit, 1)
	if tokens == "optional" && hops == 1 {
		return nil
	}
	return &types.InstanceMetadataOptionsRequest{
		HttpTokens:              types.HttpTokensState(tokens),
		HttpPutResponseHopLimit: aws.Int32(int32(hops)),
		HttpEndpoint:            types.InstanceMetadataEndpointStateEnabled,
	}
}
