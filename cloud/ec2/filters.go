package ec2

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/hangar-ci/hangar/cloud"
)

// Why filters are probed: the lookups that keep launches idempotent across
// offerings ask DescribeInstances with the client-token or hangar:intent
// filter, and not every EC2-compatible cloud serves both. Some refuse a
// filter with a 4xx code; some answer 500 with an HTML page, which the
// SDK's retryer takes for a passing fault and retries for over a minute.
// So the first use of a filter is a probe of single attempts: a refusal is
// known within a second, remembered, and the provider falls back to the
// other filter (or to none).

const (
	// refusedRecheck is how long a refused filter is not asked again: a
	// cloud may be upgraded, but not often.
	refusedRecheck = time.Hour
	// probeFaultWait is the pause before asking a failing filter a second
	// time: long enough to step over a blip, short enough to decide fast.
	probeFaultWait = 500 * time.Millisecond
	// probeAttempts bounds the single attempts of a probe that meets
	// throttling or lost answers, which decide nothing.
	probeAttempts = 4
)

type probeState int

const (
	probeUnknown probeState = iota
	probeOK
	probeRefused
)

// filterProbe is what the provider knows of one DescribeInstances filter
// on its cloud.
type filterProbe struct {
	name string // as EC2 names it, for notes and logs

	mu     sync.Mutex
	state  probeState
	at     time.Time // when it was found refused
	answer string    // what the cloud answered: "HTTP 500, not XML"
	logged bool      // the refusal was logged
}

// current is the state to act on: a refusal older than refusedRecheck is
// probed again.
func (f *filterProbe) current(now time.Time) probeState {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state == probeRefused && now.Sub(f.at) >= refusedRecheck {
		return probeUnknown
	}
	return f.state
}

func (f *filterProbe) served() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state, f.logged = probeOK, false
}

// refused records a refusal and reports whether it is news to log.
func (f *filterProbe) refused(now time.Time, answer string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state, f.at, f.answer = probeRefused, now, answer
	news := !f.logged
	f.logged = true
	return news
}

// refusal returns what the cloud answered, if it refuses the filter.
func (f *filterProbe) refusal() (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.answer, f.state == probeRefused
}

// fallback says how the provider finds earlier launches without f.
func (p *Provider) fallback(f *filterProbe) string {
	other := p.tagFilter
	if f == p.tagFilter {
		other = p.tokenFilter
	}
	if _, refused := other.refusal(); refused {
		return "launching without looking for earlier launches (a launch retried after a crash may start a second instance, which reconcile ends)"
	}
	if f == p.tokenFilter {
		return "finding earlier launches by tag only"
	}
	return "finding earlier launches by client token only"
}

// Notes names the filters this cloud refused and the fallback in use, for
// `hangar pools` (cloud.Noter).
func (p *Provider) Notes() []string {
	var notes []string
	for _, f := range []*filterProbe{p.tagFilter, p.tokenFilter} {
		if answer, refused := f.refusal(); refused {
			notes = append(notes, fmt.Sprintf("filter %s refused by the cloud (%s); %s", f.name, answer, p.fallback(f)))
		}
	}
	return notes
}

var _ cloud.Noter = (*Provider)(nil)

// describeWith sends in, which uses f, as far as f's state allows.
// refused reports that the cloud does not serve f (now, or lately): the
// caller falls back.
func (p *Provider) describeWith(ctx context.Context, f *filterProbe, in *ec2.DescribeInstancesInput) (_ *ec2.DescribeInstancesOutput, refused bool, _ error) {
	switch f.current(p.clock.Now()) {
	case probeRefused:
		return nil, true, nil
	case probeOK:
		out, err := p.api.DescribeInstances(ctx, in)
		if err != nil && filterRefused(err) {
			p.refuse(f, err)
			return nil, true, nil
		}
		return out, false, err
	}
	// Single attempts: the SDK's retryer would take an HTML 500 for a
	// passing fault and ask for a minute.
	single := func(o *ec2.Options) { o.RetryMaxAttempts = 1 }
	controlled := false
	for attempt := 1; ; attempt++ {
		out, err := p.api.DescribeInstances(ctx, in, single)
		var wait time.Duration
		switch {
		case err == nil:
			f.served()
			return out, false, nil
		case filterRefused(err):
			p.refuse(f, err)
			return nil, true, nil
		case unreadableFault(err) && controlled:
			// Failed with the filter, worked without it since, and
			// failed with it again: the cloud cannot serve it.
			p.refuse(f, err)
			return nil, true, nil
		case unreadableFault(err):
			// The filter, or the cloud? After a pause, the same Describe
			// without the filter, then the filter once more.
			if err := p.pause(ctx, probeFaultWait); err != nil {
				return nil, false, err
			}
			if err := p.control(ctx, f, err); err != nil {
				return nil, false, err
			}
			controlled = true
			continue
		case uncertain(err) && attempt < probeAttempts:
			// Throttled, no answer, or EC2's own fault: the probe
			// learned nothing.
			wait = p.backoff(attempt)
		default:
			return nil, false, err
		}
		if ctx.Err() != nil {
			return nil, false, err
		}
		t := p.clock.NewTimer(wait)
		select {
		case <-t.C():
		case <-ctx.Done():
			t.Stop()
			return nil, false, fmt.Errorf("%w; gave up: %w", err, ctx.Err())
		}
	}
}

// control asks, in one attempt, the Describe that failed with f without
// it: an error says the cloud is failing (the fault, which leaves
// everything open, is then the answer); nil, that it works without f.
//
// Single attempts, asked again only when throttled: the SDK's retryer
// would wait out a passing outage and so make it look like a refusal.
func (p *Provider) control(ctx context.Context, f *filterProbe, faultErr error) error {
	for attempt := 1; ; attempt++ {
		_, err := p.api.DescribeInstances(ctx, &ec2.DescribeInstancesInput{
			Filters:    []types.Filter{{Name: aws.String("instance-state-name"), Values: allStates}},
			MaxResults: aws.Int32(5),
		}, func(o *ec2.Options) { o.RetryMaxAttempts = 1 })
		switch {
		case err == nil:
			return nil
		case errors.Is(classOf(errorCode(err)), cloud.ErrThrottled) && attempt < probeAttempts:
			if err := p.pause(ctx, p.backoff(attempt)); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w (and without the %s filter: %w)", faultErr, f.name, err)
		}
	}
}

// pause waits d on the provider's clock, or until ctx ends.
func (p *Provider) pause(ctx context.Context, d time.Duration) error {
	t := p.clock.NewTimer(d)
	select {
	case <-t.C():
		return nil
	case <-ctx.Done():
		t.Stop()
		return ctx.Err()
	}
}

// refuse records that the cloud refused f, logging it the first time.
func (p *Provider) refuse(f *filterProbe, err error) {
	answer := answerOf(err)
	if f.refused(p.clock.Now(), answer) {
		p.log.Warn("the cloud does not serve a DescribeInstances filter; falling back",
			"filter", f.name, "answer", answer, "fallback", p.fallback(f), "recheck", refusedRecheck)
	}
}

// unreadableFault reports whether err is a 500 or 501 whose body says
// nothing EC2 would: not XML, or XML without an error code (an HTML page,
// as a web server in front of a cloud sends). It is the shape of a filter
// a cloud cannot serve, and of a cloud that is down; a 5xx with an EC2
// code (InternalError) is EC2 failing on its side, and a 502, 503 or 504
// a proxy's or a balancer's, passing: neither refuses anything.
func unreadableFault(err error) bool {
	switch errorCode(err) {
	case "", "UnknownError": // "UnknownError": the SDK's, for a body without a code
	default:
		return false
	}
	re, ok := errors.AsType[*awshttp.ResponseError](err)
	return ok && (re.HTTPStatusCode() == http.StatusInternalServerError || re.HTTPStatusCode() == http.StatusNotImplemented)
}

// answerOf words a refusal for notes and logs: "HTTP 500, not XML",
// "HTTP 400 InvalidParameterValue".
func answerOf(err error) string {
	status := "no HTTP status"
	if re, ok := errors.AsType[*awshttp.ResponseError](err); ok {
		status = fmt.Sprintf("HTTP %d", re.HTTPStatusCode())
	}
	switch code := errorCode(err); code {
	case "":
		return status + ", not XML"
	case "UnknownError":
		return status + ", no error code"
	default:
		return status + " " + code
	}
}
