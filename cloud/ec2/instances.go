package ec2

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/hangar-ci/hangar/cloud"
)

const (
	// pageSize is DescribeInstances' largest page.
	pageSize = 1000
	// maxBatch is the most instance ids one Terminate, Stop or Start takes.
	maxBatch = 1000
)

// allStates filters on every state: a listing then counts as filtered
// even without tags, which keeps it in EC2's larger throttling bucket,
// and terminated instances stay visible for the pool to see them go.
var allStates = []string{"pending", "running", "stopping", "stopped", "shutting-down", "terminated"}

// List returns the instances carrying all of tags, in one paginated
// DescribeInstances whatever the count.
func (p *Provider) List(ctx context.Context, tags map[string]string) ([]cloud.Instance, error) {
	filters := []types.Filter{{Name: aws.String("instance-state-name"), Values: allStates}}
	for _, k := range slices.Sorted(maps.Keys(tags)) {
		filters = append(filters, types.Filter{Name: aws.String("tag:" + k), Values: []string{literal(tags[k])}})
	}
	input := &ec2.DescribeInstancesInput{Filters: filters, MaxResults: aws.Int32(pageSize)}
	var out []cloud.Instance
	for {
		// Decoded lean: see listing.go.
		var page leanPage
		if _, err := p.api.DescribeInstances(ctx, input, page.option); err != nil {
			return nil, wrapErr("listing ec2 instances", err)
		}
		for _, inst := range page.instances {
			// A cloud that ignores a tag filter must not make the pool
			// adopt strangers.
			if cloud.MatchesTags(inst.Tags, tags) {
				out = append(out, inst)
			}
		}
		if page.nextToken == "" {
			return out, nil
		}
		if input.NextToken != nil && *input.NextToken == page.nextToken {
			// As the SDK's paginators: a cloud that answers the same
			// token again would page forever.
			return nil, fmt.Errorf("listing ec2 instances: the cloud answered the page token %q again", page.nextToken)
		}
		input.NextToken = aws.String(page.nextToken)
	}
}

// literal escapes EC2's filter wildcards, so that a tag value is matched
// as written.
var literal = strings.NewReplacer(`\`, `\\`, `*`, `\*`, `?`, `\?`).Replace

// stateOf translates EC2's instance state; the pool owns what it means.
func stateOf(name types.InstanceStateName) cloud.State {
	switch name {
	case types.InstanceStateNamePending:
		// Accepted; booting, or starting again after a stop.
		return cloud.StatePending
	case types.InstanceStateNameRunning:
		// The machine runs; its user-data may still be at work.
		return cloud.StateRunning
	case types.InstanceStateNameStopping:
		// A stop is under way; the disk is kept.
		return cloud.StateStopping
	case types.InstanceStateNameStopped:
		// Stopped, disk kept, no compute billed; Start boots it again.
		return cloud.StateStopped
	case types.InstanceStateNameShuttingDown:
		// Being terminated: it will not come back.
		return cloud.StateTerminating
	case types.InstanceStateNameTerminated:
		// Gone; EC2 lists it for about an hour.
		return cloud.StateTerminated
	default:
		// A state this code does not know: the pool asks again later.
		return cloud.StateUnknown
	}
}

func toInstance(in types.Instance) cloud.Instance {
	out := cloud.Instance{
		ID:        aws.ToString(in.InstanceId),
		State:     cloud.StateUnknown,
		PrivateIP: aws.ToString(in.PrivateIpAddress),
		PublicIP:  aws.ToString(in.PublicIpAddress),
		Type:      string(in.InstanceType),
		Image:     aws.ToString(in.ImageId),
		// The instance's place in its launch; the pool matches a batch's
		// instances to their slots by it.
		LaunchIndex: int(aws.ToInt32(in.AmiLaunchIndex)),
	}
	if in.State != nil {
		out.State = stateOf(in.State.Name)
	}
	if in.Placement != nil {
		out.Zone = aws.ToString(in.Placement.AvailabilityZone)
	}
	if in.LaunchTime != nil {
		out.LaunchedAt = *in.LaunchTime
	}
	if len(in.Tags) > 0 {
		out.Tags = make(map[string]string, len(in.Tags))
		for _, t := range in.Tags {
			out.Tags[aws.ToString(t.Key)] = aws.ToString(t.Value)
		}
	}
	return out
}

// Terminate ends the instances in batches. An id EC2 does not know counts
// as ended, except one this provider launched within the consistency
// window: EC2 may simply not show it yet, and calling it ended would leak
// a running instance, so it gets an error and the pool's reconcile retries.
func (p *Provider) Terminate(ctx context.Context, ids []string) ([]string, error) {
	return p.batches(ctx, "terminating", ids, true, func(ctx context.Context, batch []string) error {
		_, err := p.api.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: batch})
		return err
	})
}

// Stop stops the instances in batches, keeping their disks. An unknown id
// fails alone with an ErrNotFound error; the others are still stopped.
func (p *Provider) Stop(ctx context.Context, ids []string) ([]string, error) {
	return p.batches(ctx, "stopping", ids, false, func(ctx context.Context, batch []string) error {
		_, err := p.api.StopInstances(ctx, &ec2.StopInstancesInput{InstanceIds: batch})
		return err
	})
}

// Start boots stopped instances in batches. An unknown id fails alone with
// an ErrNotFound error; the others are still started.
func (p *Provider) Start(ctx context.Context, ids []string) ([]string, error) {
	return p.batches(ctx, "starting", ids, false, func(ctx context.Context, batch []string) error {
		_, err := p.api.StartInstances(ctx, &ec2.StartInstancesInput{InstanceIds: batch})
		return err
	})
}

// batches calls call on ids, at most maxBatch at a time. EC2 rejects a
// whole call for one unknown id (or one in the wrong state), naming it in
// the message: such ids are set apart and the rest is sent again; when the
// message names none, each id goes alone. unknownOK says whether an
// unknown id counts as done (terminating) or as an ErrNotFound failure.
func (p *Provider) batches(ctx context.Context, verb string, ids []string, unknownOK bool, call func(context.Context, []string) error) ([]string, error) {
	var done []string
	var errs []error
	ids = slices.Compact(slices.Sorted(slices.Values(ids)))
	for i := 0; i < len(ids); i += maxBatch {
		if err := ctx.Err(); err != nil {
			errs = append(errs, fmt.Errorf("%s %d ec2 instances: not sent: %w", verb, len(ids)-i, err))
			break
		}
		d, err := p.batch(ctx, verb, ids[i:min(i+maxBatch, len(ids))], unknownOK, call)
		done = append(done, d...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	slices.Sort(done)
	return done, errors.Join(errs...)
}

func (p *Provider) batch(ctx context.Context, verb string, ids []string, unknownOK bool, call func(context.Context, []string) error) ([]string, error) {
	var done []string
	var errs []error
	pending := slices.Clone(ids)
	for len(pending) > 0 {
		err := call(ctx, pending)
		if err == nil {
			return append(done, pending...), errors.Join(errs...)
		}
		code := errorCode(err)
		perInstance := slices.Contains(notFoundCodes, code) || slices.Contains(instanceStateCodes, code)
		if !perInstance {
			errs = append(errs, wrapErr(fmt.Sprintf("%s %d ec2 instances", verb, len(pending)), err))
			return done, errors.Join(errs...)
		}
		bad := idsIn(err, pending)
		if len(bad) == 0 && len(pending) > 1 {
			// EC2 did not say which: find out one by one.
			for _, id := range pending {
				if ctx.Err() != nil {
					errs = append(errs, fmt.Errorf("%s ec2 instance %s: %w", verb, id, ctx.Err()))
					continue
				}
				d, err := p.batch(ctx, verb, []string{id}, unknownOK, call)
				done = append(done, d...)
				if err != nil {
					errs = append(errs, err)
				}
			}
			return done, errors.Join(errs...)
		}
		if len(bad) == 0 {
			bad = pending
		}
		for _, id := range bad {
			age, recent := p.recent.age(id)
			switch {
			case !slices.Contains(notFoundCodes, code):
				errs = append(errs, wrapErr(fmt.Sprintf("%s ec2 instance %s", verb, id), err))
			case recent:
				errs = append(errs, fmt.Errorf("%s ec2 instance %s: launched %s ago and not yet visible to EC2 (eventual consistency): %s", verb, id, age.Round(time.Second), code))
			case unknownOK:
				done = append(done, id)
			default:
				errs = append(errs, wrapErr(fmt.Sprintf("%s ec2 instance %s", verb, id), err))
			}
		}
		pending = slices.DeleteFunc(pending, func(id string) bool { return slices.Contains(bad, id) })
	}
	return done, errors.Join(errs...)
}

// ConsoleOutput returns the instance's console log. It asks for the latest
// output (Nitro instances have it live) and falls back to EC2's periodic
// snapshot where the instance or the cloud does not support that.
func (p *Provider) ConsoleOutput(ctx context.Context, id string) ([]byte, error) {
	doing := "getting the console output of ec2 instance " + id
	out, err := p.api.GetConsoleOutput(ctx, &ec2.GetConsoleOutputInput{InstanceId: aws.String(id), Latest: aws.Bool(true)})
	if err != nil && latestUnsupported(err) {
		out, err = p.api.GetConsoleOutput(ctx, &ec2.GetConsoleOutputInput{InstanceId: aws.String(id)})
	}
	if err != nil {
		return nil, wrapErr(doing, err)
	}
	if out.Output == nil {
		return nil, nil
	}
	b, err := base64.StdEncoding.DecodeString(*out.Output)
	if err != nil {
		return nil, fmt.Errorf("%s: decoding: %w", doing, err)
	}
	return b, nil
}

// latestUnsupported reports whether err is EC2 (or a compatible cloud)
// refusing GetConsoleOutput's Latest parameter.
func latestUnsupported(err error) bool {
	switch errorCode(err) {
	case "UnsupportedOperation", "InvalidParameter", "InvalidParameterValue",
		"InvalidParameterCombination", "UnknownParameter", "InvalidAction":
		return true
	}
	return false
}
