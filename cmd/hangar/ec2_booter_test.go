package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/userdata"
)

// fakeBooter plays the instances of an EC2 test server, which keeps them in
// memory and runs nothing: each new instance reads its user-data, enrolls
// when that carries a batch token (with its signed identity document when
// asked), and reports ready with its own token, as generic.sh does; nothing
// after that. For benchmarks of many instances, where booting real ones
// would measure the machine.
type fakeBooter struct {
	srv    *ec2test.Server
	client *http.Client

	mu       sync.Mutex
	seen     map[string]bool
	ready    int
	enrolls  []time.Duration // from the first enroll call to the token
	failures []error
}

func newFakeBooter(srv *ec2test.Server) *fakeBooter {
	return &fakeBooter{srv: srv, seen: map[string]bool{},
		client: &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}
}

// run boots every instance that appears, checking every 100 ms, with at
// most 64 at once, until ctx ends.
func (b *fakeBooter) run(ctx context.Context) {
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, in := range b.srv.Instances() {
			b.mu.Lock()
			fresh := !b.seen[in.ID] && (in.State == "pending" || in.State == "running")
			b.seen[in.ID] = true
			b.mu.Unlock()
			if !fresh {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				if err := b.boot(ctx, in); err != nil && ctx.Err() == nil {
					b.mu.Lock()
					b.failures = append(b.failures, fmt.Errorf("instance %s: %w", in.ID, err))
					b.mu.Unlock()
				}
			}()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (b *fakeBooter) boot(ctx context.Context, in ec2test.Instance) error {
	env := userdata.Exports(in.UserData)
	base, token := env["HANGAR_URL"], env["HANGAR_BOOTSTRAP_TOKEN"]
	if base == "" || token == "" {
		return errors.New("user-data has no HANGAR_URL or HANGAR_BOOTSTRAP_TOKEN")
	}
	if env["HANGAR_ENROLL"] == "1" {
		start := time.Now()
		own, err := b.enroll(ctx, base, token, in.ID, env["HANGAR_IDENTITY"] == "signed")
		if err != nil {
			return err
		}
		b.mu.Lock()
		b.enrolls = append(b.enrolls, time.Since(start))
		b.mu.Unlock()
		token = own
	}
	code, _, err := b.post(ctx, base+"/bootstrap/v1/ready", token, url.Values{"hostname": {in.ID}})
	if err != nil {
		return fmt.Errorf("ready: %w", err)
	}
	if code != http.StatusNoContent {
		return fmt.Errorf("ready: HTTP %d", code)
	}
	b.mu.Lock()
	b.ready++
	b.mu.Unlock()
	return nil
}

// enroll trades the batch token for the instance's own, asking again
// while the launch has not answered (503), as generic.sh does.
func (b *fakeBooter) enroll(ctx context.Context, base, batchToken, id string, signed bool) (string, error) {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	form := url.Values{"instance_id": {id}, "enroll_key": {hex.EncodeToString(key)}}
	if signed {
		doc, sig, err := b.srv.IdentityDocument(id)
		if err != nil {
			return "", err
		}
		form.Set("document", string(doc))
		form.Set("signature", string(sig))
	}
	for {
		code, body, err := b.post(ctx, base+"/bootstrap/v1/enroll", batchToken, form)
		switch {
		case err != nil:
			return "", err
		case code == http.StatusOK:
			token, ok := userdata.Exports([]byte("export " + body))["HANGAR_BOOTSTRAP_TOKEN"]
			if !ok {
				return "", fmt.Errorf("enroll answered %q", body)
			}
			return token, nil
		case code == http.StatusServiceUnavailable:
			select {
			case <-ctx.Done():
				return "", ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		default:
			return "", fmt.Errorf("enroll: %d %s", code, strings.TrimSpace(body))
		}
	}
}

func (b *fakeBooter) post(ctx context.Context, u, token string, form url.Values) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader(form.Encode()))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := b.client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	return resp.StatusCode, string(body), err
}

// readyCount is how many instances reported ready.
func (b *fakeBooter) readyCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ready
}

// errs are the boots that failed.
func (b *fakeBooter) errs() []error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.failures)
}

// enrollQuantile is the q-quantile of the enrollments' latencies (0 with none).
func (b *fakeBooter) enrollQuantile(q float64) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.enrolls) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(b.enrolls))
	return s[min(int(q*float64(len(s))), len(s)-1)]
}
