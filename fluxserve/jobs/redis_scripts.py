"""The Redis JobStore's transitions: one Lua script each, so every transition is atomic on the server.

Key layout (P is the key prefix, `fluxserve` by default):

    P:job:<id>            hash   one field per Job dataclass field, each value JSON text; plus `_seq`
    P:seq                 string submission counter (FIFO order)
    P:queued:<slug>       zset   QUEUED jobs of one model: score = seq, member = id
    P:slugs               set    every slug that has had a queue (a claim with no filter looks at all)
    P:leases              zset   PROCESSING jobs: score = lease expiry (server clock), member = id
    P:ended:<STATE>       zset   COMPLETED / FAILED jobs: score = expires_at, member = id
    P:ended               channel  pub/sub: the id of each job that just ended (wakes waiters)

Every script takes the prefix as ARGV[1]. Times come from the Redis server's clock (TIME), so leases
mean the same on every host whatever their clocks say. Values the scripts write are JSON text made
by the caller (tokens, results, errors) or numbers, so Python decodes every field with json.loads.
The client retries a command whose connection broke. SUBMIT answers a repeat of a call that already
took effect as the first time. A repeated CLAIM leases a second job (the first one's lease lapses and
it runs later, as after any crash); a repeated FINISH answers 0, as for any ended job.
Scripts name keys they compute from the prefix, so the store needs a single Redis (or a Sentinel
primary), not Redis Cluster.
"""

from __future__ import annotations

# Helpers shared by every script.
PRELUDE = """
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.6f', x) end
local function job_key(id) return P .. ':job:' .. id end
local function field(id, name) return redis.call('HGET', job_key(id), name) end
local function holds_lease(id, token_json)
  return field(id, 'state') == '"PROCESSING"' and field(id, 'lease_token') == token_json
end
-- PROCESSING -> COMPLETED | FAILED; the record stays for `retention` seconds, then purge_expired
-- removes it (the key's own TTL, a day later, only matters when no janitor ever runs).
local function end_job(id, state, result_json, error_json, retention)
  local t = now()
  local expires = t + retention
  local key = job_key(id)
  redis.call('HSET', key, 'state', '"' .. state .. '"', 'result', result_json, 'error', error_json,
             'finished_at', num(t), 'expires_at', num(expires), 'lease_token', 'null',
             'lease_expires_at', 'null')
  redis.call('ZREM', P .. ':leases', id)
  redis.call('ZADD', P .. ':ended:' .. state, expires, id)
  redis.call('EXPIREAT', key, math.ceil(expires) + 86400)
  redis.call('PUBLISH', P .. ':ended', id)
end
"""

# ARGV: P, id, slug, created_at ('' = now), then field/value pairs of the whole record.
SUBMIT = """
local id, slug = ARGV[2], ARGV[3]
local key = job_key(id)
-- Only a retried call (its first reply was lost) finds the job there already: ids are uuid4.
if redis.call('EXISTS', key) == 1 then return redis.call('HGET', key, 'created_at') end
local seq = redis.call('INCR', P .. ':seq')
local created = ARGV[4]
if created == '' then created = num(now()) end
redis.call('HSET', key, unpack(ARGV, 5))
redis.call('HSET', key, 'created_at', created, '_seq', seq)
redis.call('ZADD', P .. ':queued:' .. slug, seq, id)
redis.call('SADD', P .. ':slugs', slug)
return created
"""

# ARGV: P, id. The record as a flat field/value list, or nil when unknown or past retention.
GET = """
local key = job_key(ARGV[2])
local record = redis.call('HGETALL', key)
if #record == 0 then return nil end
local expires = redis.call('HGET', key, 'expires_at')
if expires and expires ~= 'null' and tonumber(expires) <= now() then return nil end
return record
"""

# ARGV: P, id. Jobs of the same slug ahead of this one; nil unless QUEUED.
POSITION = """
local id = ARGV[2]
if field(id, 'state') ~= '"QUEUED"' then return nil end
return redis.call('ZRANK', P .. ':queued:' .. cjson.decode(field(id, 'slug')), id)
"""

# ARGV: P, token (JSON), lease_seconds, max_attempts, retention, exhausted error (JSON), slugs...
# First every lapsed lease is settled: back to its queue at its old place, or FAILED when it used its
# last attempt. Then the oldest head among the slugs' queues is leased.
CLAIM = """
local token, lease, max_attempts, retention = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = now()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', t, 'LIMIT', 0, 100)) do
  if redis.call('EXISTS', job_key(id)) == 0 then
    redis.call('ZREM', P .. ':leases', id)
  elseif tonumber(field(id, 'attempts')) >= max_attempts then
    end_job(id, 'FAILED', '{}', ARGV[6], retention)
  else
    redis.call('HSET', job_key(id), 'state', '"QUEUED"', 'lease_token', 'null', 'lease_expires_at', 'null')
    redis.call('ZREM', P .. ':leases', id)
    redis.call('ZADD', P .. ':queued:' .. cjson.decode(field(id, 'slug')), field(id, '_seq'), id)
  end
end
local slugs = {}
for i = 7, #ARGV do slugs[#slugs + 1] = ARGV[i] end
if #slugs == 0 then slugs = redis.call('SMEMBERS', P .. ':slugs') end
local best, best_seq, best_queue = nil, nil, nil
for _, slug in ipairs(slugs) do
  local queue = P .. ':queued:' .. slug
  local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
  if #head > 0 and (best == nil or tonumber(head[2]) < best_seq) then
    best, best_seq, best_queue = head[1], tonumber(head[2]), queue
  end
end
if best == nil then return nil end
redis.call('ZREM', best_queue, best)
local key = job_key(best)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'state', '"PROCESSING"', 'lease_token', token, 'lease_expires_at', num(t + lease),
           'started_at', num(t))
redis.call('ZADD', P .. ':leases', t + lease, best)
return redis.call('HGETALL', key)
"""

# ARGV: P, id, token (JSON), lease_seconds. 1 when the lease was ours and is extended, else 0.
HEARTBEAT = """
local id = ARGV[2]
if not holds_lease(id, ARGV[3]) then return 0 end
local expires = now() + tonumber(ARGV[4])
redis.call('HSET', job_key(id), 'lease_expires_at', num(expires))
redis.call('ZADD', P .. ':leases', expires, id)
return 1
"""

# ARGV: P, id, token (JSON), COMPLETED | FAILED, result (JSON), error (JSON), retention.
FINISH = """
local id = ARGV[2]
if not holds_lease(id, ARGV[3]) then return 0 end
end_job(id, ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
return 1
"""

# ARGV: P, limit. Removes up to `limit` ended jobs past their retention; returns their records.
PURGE_EXPIRED = """
local t, limit = now(), tonumber(ARGV[2])
local purged = {}
for _, state in ipairs({'COMPLETED', 'FAILED'}) do
  local ended = P .. ':ended:' .. state
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', ended, '-inf', t, 'LIMIT', 0, limit)) do
    local record = redis.call('HGETALL', job_key(id))
    if #record > 0 then purged[#purged + 1] = record end
    redis.call('DEL', job_key(id))
    redis.call('ZREM', ended, id)
  end
end
return purged
"""

# ARGV: P. Flat list: QUEUED n, PROCESSING n, COMPLETED n, FAILED n (ended jobs still retained).
COUNT_BY_STATE = """
local t = now()
local queued = 0
for _, slug in ipairs(redis.call('SMEMBERS', P .. ':slugs')) do
  queued = queued + redis.call('ZCARD', P .. ':queued:' .. slug)
end
return {'QUEUED', queued, 'PROCESSING', redis.call('ZCARD', P .. ':leases'),
        'COMPLETED', redis.call('ZCOUNT', P .. ':ended:COMPLETED', '(' .. t, '+inf'),
        'FAILED', redis.call('ZCOUNT', P .. ':ended:FAILED', '(' .. t, '+inf')}
"""
