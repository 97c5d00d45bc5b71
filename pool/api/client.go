package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
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
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.BaseURL, "/")+path, rd)
	if err != nil {
		return 0, fmt.Errorf("building request: %w", err)
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
		return 0, fmt.Errorf("calling hangar at %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("reading hangar's answer: %w", err)
	}
	if resp.StatusCode >= 400 {
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Message == "" {
			e.Message, e.Code = fmt.Sprintf("hangar answered %s", resp.Status), "http"
		}
		return resp.StatusCode, e
	}
	if out != nil && resp.StatusCode != http.StatusNoContent {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decoding hangar's answer: %w", err)
		}
	}
	return resp.StatusCode, nil
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
