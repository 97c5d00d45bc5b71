package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/pool"
)

// Client calls a Hangar server's API. The CLI is built on it.
type Client struct {
	BaseURL string
	Token   string
	HTTP    *http.Client // nil: http.DefaultClient (waits are bounded by the server)
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) (int, error) {
	status, _, data, err := c.send(ctx, method, path, body)
	if err != nil {
		return 0, err
	}
	if out != nil && status != http.StatusNoContent {
		if err := json.Unmarshal(data, out); err != nil {
			return status, fmt.Errorf("decoding hangar's answer: %w", err)
		}
	}
	return status, nil
}

// send makes a call and returns the answer's status, header and body, or
// the API's error. The response's body is read and closed here.
func (c *Client) send(ctx context.Context, method, path string, body any) (int, http.Header, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.BaseURL, "/")+path, rd)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("building request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			// Nothing listens there: most often no server at all, or
			// another address than the one it serves on.
			return 0, nil, nil, fmt.Errorf("cannot reach Hangar at %s: is \"hangar serve\" running? (--server / HANGAR_SERVER): %w", c.BaseURL, err)
		}
		return 0, nil, nil, fmt.Errorf("calling hangar at %s: %w", c.BaseURL, err)
	}
	defer func() { _ = resp.Body.Close() }()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return 0, nil, nil, fmt.Errorf("reading hangar's answer: %w", err)
	}
	if resp.StatusCode >= 400 {
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Message == "" {
			e.Message, e.Code = fmt.Sprintf("hangar answered %s", resp.Status), "http"
		}
		if resp.StatusCode == http.StatusUnauthorized {
			e.Message += " (give an API token with --token or HANGAR_TOKEN)"
		}
		return 0, nil, nil, e
	}
	return resp.StatusCode, resp.Header, data, nil
}

// Lease asks for a lease; it comes back active or, if wait ran out, pending.
func (c *Client) Lease(ctx context.Context, req LeaseRequest) (pool.LeaseView, error) {
	var v pool.LeaseView
	_, err := c.do(ctx, http.MethodPost, "/v1/leases", req, &v)
	return v, err
}

// GetLease reads a lease, waiting up to wait while it is pending.
func (c *Client) GetLease(ctx context.Context, id string, wait time.Duration) (pool.LeaseView, error) {
	var v pool.LeaseView
	_, err := c.do(ctx, http.MethodGet, "/v1/leases/"+url.PathEscape(id)+"?wait="+wait.String(), nil, &v)
	return v, err
}

// Renew extends a lease by its TTL.
func (c *Client) Renew(ctx context.Context, id string) (pool.LeaseView, error) {
	var v pool.LeaseView
	_, err := c.do(ctx, http.MethodPost, "/v1/leases/"+url.PathEscape(id)+"/renew", nil, &v)
	return v, err
}

// Release ends a lease; discard terminates its instance.
func (c *Client) Release(ctx context.Context, id string, discard bool) error {
	_, err := c.do(ctx, http.MethodDelete, fmt.Sprintf("/v1/leases/%s?discard=%t", url.PathEscape(id), discard), nil, nil)
	return err
}

// Pools lists the pools.
func (c *Client) Pools(ctx context.Context) ([]pool.PoolView, error) {
	var v struct{ Pools []pool.PoolView }
	_, err := c.do(ctx, http.MethodGet, "/v1/pools", nil, &v)
	return v.Pools, err
}

// Scale sets a pool's min_idle and/or max_instances.
func (c *Client) Scale(ctx context.Context, name string, req ScaleRequest) (pool.PoolView, error) {
	var v pool.PoolView
	_, err := c.do(ctx, http.MethodPatch, "/v1/pools/"+url.PathEscape(name), req, &v)
	return v, err
}

// CacheSnapshots lists the snapshots of a pool's cache, newest first.
func (c *Client) CacheSnapshots(ctx context.Context, poolName string) ([]pool.CacheSnapshotView, error) {
	var v struct{ Snapshots []pool.CacheSnapshotView }
	_, err := c.do(ctx, http.MethodGet, "/v1/pools/"+url.PathEscape(poolName)+"/cache/snapshots", nil, &v)
	return v.Snapshots, err
}

// SnapshotCache snapshots a pool's cache now and returns the snapshot.
func (c *Client) SnapshotCache(ctx context.Context, poolName string) (pool.CacheSnapshotView, error) {
	var v pool.CacheSnapshotView
	_, err := c.do(ctx, http.MethodPost, "/v1/pools/"+url.PathEscape(poolName)+"/cache/snapshots", nil, &v)
	return v, err
}

// DropCache deletes every snapshot of a pool's cache and returns their ids.
func (c *Client) DropCache(ctx context.Context, poolName string) ([]string, error) {
	var v struct{ Deleted []string }
	_, err := c.do(ctx, http.MethodDelete, "/v1/pools/"+url.PathEscape(poolName)+"/cache/snapshots", nil, &v)
	return v.Deleted, err
}

// UseImage makes a pool with [bake] launch from image from now on; roll
// ends its idle instances on other images at once.
func (c *Client) UseImage(ctx context.Context, poolName, image string, roll bool) (ImageAnswer, error) {
	var v ImageAnswer
	_, err := c.do(ctx, http.MethodPut, "/v1/pools/"+url.PathEscape(poolName)+"/image", ImageRequest{Image: image, Roll: roll}, &v)
	return v, err
}

// Leases lists the caller's leases (an admin's: all) of a pool and in a
// state ("" for any), without passwords.
func (c *Client) Leases(ctx context.Context, poolName string, state pool.LeaseState) ([]pool.LeaseView, error) {
	var v struct{ Leases []pool.LeaseView }
	q := url.Values{}
	if poolName != "" {
		q.Set("pool", poolName)
	}
	if state != "" {
		q.Set("state", string(state))
	}
	path := "/v1/leases"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	_, err := c.do(ctx, http.MethodGet, path, nil, &v)
	return v.Leases, err
}

// Instances lists the instances of a pool ("" for all).
func (c *Client) Instances(ctx context.Context, poolName string) ([]pool.InstanceView, error) {
	var v struct{ Instances []pool.InstanceView }
	_, err := c.do(ctx, http.MethodGet, "/v1/instances?pool="+url.QueryEscape(poolName), nil, &v)
	return v.Instances, err
}

// Drain takes an instance out of service.
func (c *Client) Drain(ctx context.Context, id string) (pool.InstanceView, error) {
	var v pool.InstanceView
	_, err := c.do(ctx, http.MethodPost, "/v1/instances/"+url.PathEscape(id)+"/drain", nil, &v)
	return v, err
}

// Console returns an instance's console output.
func (c *Client) Console(ctx context.Context, id string) (string, error) {
	var v struct{ Output string }
	_, err := c.do(ctx, http.MethodGet, "/v1/instances/"+url.PathEscape(id)+"/console", nil, &v)
	return v.Output, err
}

// StartRun runs a command on the instance of a lease the caller holds, once
// its previous run has exited.
func (c *Client) StartRun(ctx context.Context, id string, command []string) (pool.LeaseView, error) {
	var v pool.LeaseView
	_, err := c.do(ctx, http.MethodPost, "/v1/leases/"+url.PathEscape(id)+"/runs", RunRequest{Command: command}, &v)
	return v, err
}

// Output reads a run's output from offset, waiting up to wait for some. run
// 0 is the lease's latest run; epoch is the Epoch of the previous answer
// ("" at first).
func (c *Client) Output(ctx context.Context, id string, run int, offset int64, epoch string, wait time.Duration) (pool.RunOutput, error) {
	q := url.Values{"offset": {strconv.FormatInt(offset, 10)}, "wait": {wait.String()}}
	if run > 0 {
		q.Set("run", strconv.Itoa(run))
	}
	if epoch != "" {
		q.Set("epoch", epoch)
	}
	_, h, data, err := c.send(ctx, http.MethodGet, "/v1/leases/"+url.PathEscape(id)+"/output?"+q.Encode(), nil)
	if err != nil {
		return pool.RunOutput{}, err
	}
	out := pool.RunOutput{Data: data, Epoch: h.Get(HeaderEpoch), State: pool.RunState(h.Get(HeaderRunState)), Reset: h.Get(HeaderReset) == "true"}
	var problems []string
	num := func(name string, dst *int64) {
		v := h.Get(name)
		if v == "" {
			return
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			problems = append(problems, name)
		}
		*dst = n
	}
	var runID, exit int64 = 0, -1
	num(HeaderRun, &runID)
	num(HeaderOffset, &out.Offset)
	num(HeaderNext, &out.Next)
	num(HeaderSkipped, &out.Skipped)
	num(HeaderExitCode, &exit)
	if h.Get(HeaderNext) == "" || out.Next != out.Offset+int64(len(data)) {
		problems = append(problems, HeaderNext)
	}
	if len(problems) > 0 {
		return pool.RunOutput{}, fmt.Errorf("reading hangar's output answer: bad %s", strings.Join(problems, ", "))
	}
	out.Run = int(runID)
	if exit >= 0 {
		out.Done, out.ExitCode = true, int(exit)
	}
	return out, nil
}
