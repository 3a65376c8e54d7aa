"""The Redis JobStore's transitions: one Lua script each, so every transition is atomic on the server.

Key layout (P is the key prefix, `fluxserve` by default):

    P:job:<id>            hash   one field per Job dataclass field, each value JSON text; plus `_seq`,
                                 and `_idem` / `_idem_fingerprint` (its P:idem key name and the
                                 request's fingerprint) when it was submitted with an Idempotency-Key
    P:seq                 string submission counter (FIFO order)
    P:queued:<slug>       zset   QUEUED jobs of one model: score = seq, member = id
    P:active:<slug>       zset   QUEUED and PROCESSING jobs of one model: score = seq, member = id; added
                                 by SUBMIT, removed when the job ends (FINISH, CANCEL, a claim's FAILED
                                 for exhausted attempts; PURGE_EXPIRED too). What an autoscaler counts
                                 (ZCARD) to size the model's workers: `redis.active_key`, deploy/helm
    P:slugs               set    every slug that has had a queue (a claim with no filter looks at all)
    P:leases              zset   PROCESSING jobs: score = when the job may be taken over (server clock):
                                 its lease's expiry plus the policy's reclaim delay; member = id
    P:claim:<token>       string the id of the job leased under a token, while that lease may be held
                                 (so a repeated CLAIM answers the same lease)
    P:ended:<STATE>       zset   COMPLETED / FAILED jobs: score = expires_at, member = id
    P:ended               channel  pub/sub: the id of each job that just ended (wakes waiters)
    P:queued              channel  pub/sub: the slug of each job just submitted (wakes idle workers)
    P:idem:<scope>        string the id of the job holding an Idempotency-Key; scope = JSON [owner, key]
    P:deliveries:<id>     list   the job's webhook delivery ids, oldest first
    P:delivery:<id>       hash   one field per Delivery dataclass field (JSON), plus `_lease_token`
                                 and `_released_by` (the token of the lease last released)
    P:outbox              zset   pending deliveries whose trigger has happened: score = when one may
                                 next be claimed (due, retry or lease-expiry time), member = delivery id
    P:delivery-claim:<token>  string the id of the delivery leased under a token, while its lease lasts

A delivery enters P:outbox when its trigger happens (CLAIM for 'started', a job's end for 'finished')
and leaves it when it is delivered or given up. An idempotency key, the deliveries and the job are
written in one SUBMIT, expire with the job (EXPIREAT when it ends) and are deleted with it by
PURGE_EXPIRED; a key whose job is past retention is free to be taken by a new job.

Every script takes the prefix as ARGV[1]. Times come from the Redis server's clock (TIME), so leases
mean the same on every host whatever their clocks say (a delivery's retry time travels as a delay).
Values the scripts write in dataclass fields are JSON text made by the caller (tokens, results,
errors) or numbers, so Python decodes every field with json.loads; `_`-fields are the store's own.
The client retries a command whose connection broke, and a retry re-sends a command that may already
have taken effect. SUBMIT answers such a repeat as the first time, and so do CANCEL, CLAIM and
CLAIM_DELIVERY (the token is made once per call by the caller: a repeat finds the lease it took) and
FINISH (the ended job keeps its lease token: 1 again when it ended in that state under that token) and
RECORD_ATTEMPT (the delivery keeps the token it was released under). A repeated PURGE_EXPIRED answers
fewer records: the janitor deletes the media of the jobs EXPIRED lists before it purges them.
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
local function ms(x) return string.format('%.0f', math.ceil(x * 1000)) end  -- a PEXPIREAT argument
local function job_key(id) return P .. ':job:' .. id end
local function field(id, name) return redis.call('HGET', job_key(id), name) end
local function holds_lease(id, token_json)
  return field(id, 'state') == '"PROCESSING"' and field(id, 'lease_token') == token_json
end
local function claim_key(token_json) return P .. ':claim:' .. cjson.decode(token_json) end
-- When a lease expiring at `expires` may be taken over: after the policy's reclaim delay for a job that
-- had `attempts` claims. `delays_json`: the delays after 1, 2, ... claims; the last one repeats.
local function reclaim_at(expires, attempts, delays_json)
  local delays = cjson.decode(delays_json)
  return expires + delays[math.max(1, math.min(attempts, #delays))]
end
-- The job is PROCESSING under `token_json` until `expires`, and may be taken over at `due`.
local function hold(id, token_json, expires, due)
  redis.call('HSET', job_key(id), 'lease_token', token_json, 'lease_expires_at', num(expires))
  redis.call('ZADD', P .. ':leases', due, id)
  redis.call('SET', claim_key(token_json), id)
  redis.call('PEXPIREAT', claim_key(token_json), ms(due))
end
-- Ends the job's lease (the job ended, or went back to its queue): it forgets the claim's token.
local function drop_lease(id)
  local token_json = field(id, 'lease_token')
  if token_json and token_json ~= 'null' then redis.call('DEL', claim_key(token_json)) end
  redis.call('ZREM', P .. ':leases', id)
end
-- The record as a flat field/value list, or nil when unknown or past retention.
local function live_record(id)
  local key = job_key(id)
  local record = redis.call('HGETALL', key)
  if #record == 0 then return nil end
  local expires = redis.call('HGET', key, 'expires_at')
  if expires and expires ~= 'null' and tonumber(expires) <= now() then return nil end
  return record
end
local function delivery_key(id) return P .. ':delivery:' .. id end
local function deliveries_key(job_id) return P .. ':deliveries:' .. job_id end
-- The job's pending deliveries waiting for `trigger` ('started' | 'finished') become due. NX keeps the
-- place of one already in the outbox (a 'started' delivery of a job claimed a second time).
local function release_deliveries(id, trigger, t)
  for _, d in ipairs(redis.call('LRANGE', deliveries_key(id), 0, -1)) do
    local values = redis.call('HMGET', delivery_key(d), 'trigger', 'state', 'next_attempt_at')
    if values[1] == '"' .. trigger .. '"' and values[2] == '"pending"' then
      redis.call('ZADD', P .. ':outbox', 'NX', math.max(t, tonumber(values[3])), d)
    end
  end
end
-- The keys that live as long as the job: its record, its deliveries and its idempotency key.
local function expire_with_job(id, at)
  local key = job_key(id)
  redis.call('EXPIREAT', key, at)
  local idem = redis.call('HGET', key, '_idem')
  if idem and redis.call('GET', idem) == id then redis.call('EXPIREAT', idem, at) end
  for _, d in ipairs(redis.call('LRANGE', deliveries_key(id), 0, -1)) do
    redis.call('EXPIREAT', delivery_key(d), at)
  end
  redis.call('EXPIREAT', deliveries_key(id), at)
end
-- QUEUED | PROCESSING -> COMPLETED | FAILED; the record stays for `retention` seconds, then
-- purge_expired removes it (the keys' own TTL, a day later, only matters when no janitor ever runs).
-- Its 'finished' deliveries become due. `token_json` stays as its lease token: the one it ended under
-- (so a repeated FINISH is recognised), or 'null' when the lease was revoked.
local function end_job(id, state, result_json, error_json, retention, token_json)
  local t = now()
  local expires = t + retention
  local key = job_key(id)
  drop_lease(id)
  redis.call('HSET', key, 'state', '"' .. state .. '"', 'result', result_json, 'error', error_json,
             'finished_at', num(t), 'expires_at', num(expires), 'lease_token', token_json,
             'lease_expires_at', 'null')
  redis.call('ZADD', P .. ':ended:' .. state, expires, id)
  redis.call('ZREM', P .. ':active:' .. cjson.decode(field(id, 'slug')), id)
  release_deliveries(id, 'finished', t)
  expire_with_job(id, math.ceil(expires) + 86400)
  redis.call('PUBLISH', P .. ':ended', id)
end
"""

# ARGV: P, id, slug, created_at ('' = now), idempotency scope ('' = none), its fingerprint,
# deliveries (JSON list of [delivery id, [field, value, ...]]), then field/value pairs of the record.
# Answers {'created', created_at}; with an idempotency scope held by a live job, creates nothing and
# answers {'existing', its record} (same fingerprint) or {'conflict', its id}.
SUBMIT = """
local id, slug, scope, fingerprint = ARGV[2], ARGV[3], ARGV[5], ARGV[6]
local key = job_key(id)
-- Only a retried call (its first reply was lost) finds the job there already: ids are uuid4.
if redis.call('EXISTS', key) == 1 then return {'created', redis.call('HGET', key, 'created_at')} end
local idem = nil
if scope ~= '' then
  idem = P .. ':idem:' .. scope
  local holder = redis.call('GET', idem)
  local record = holder and live_record(holder)
  if record then
    if field(holder, '_idem_fingerprint') ~= fingerprint then return {'conflict', holder} end
    return {'existing', record}
  end
  redis.call('SET', idem, id)  -- free, or held by a job past retention: the key is ours now
end
local seq = redis.call('INCR', P .. ':seq')
local created = ARGV[4]
if created == '' then created = num(now()) end
redis.call('HSET', key, unpack(ARGV, 8))
redis.call('HSET', key, 'created_at', created, '_seq', seq)
if idem then redis.call('HSET', key, '_idem', idem, '_idem_fingerprint', fingerprint) end
for _, delivery in ipairs(cjson.decode(ARGV[7])) do
  redis.call('HSET', delivery_key(delivery[1]), unpack(delivery[2]))
  redis.call('RPUSH', deliveries_key(id), delivery[1])
end
redis.call('ZADD', P .. ':queued:' .. slug, seq, id)
redis.call('ZADD', P .. ':active:' .. slug, seq, id)
redis.call('SADD', P .. ':slugs', slug)
redis.call('PUBLISH', P .. ':queued', slug)  -- wakes idle workers of this model
return {'created', created}
"""

# ARGV: P, scope, fingerprint. The live job holding an Idempotency-Key: {'existing', record},
# {'conflict', id} when it came with another fingerprint, or nil when the key is free.
FIND_IDEMPOTENT = """
local holder = redis.call('GET', P .. ':idem:' .. ARGV[2])
local record = holder and live_record(holder)
if not record then return nil end
if field(holder, '_idem_fingerprint') ~= ARGV[3] then return {'conflict', holder} end
return {'existing', record}
"""

# ARGV: P, id. The record as a flat field/value list, or nil when unknown or past retention.
GET = """
return live_record(ARGV[2])
"""

# ARGV: P, id. Jobs of the same slug ahead of this one; nil unless QUEUED.
POSITION = """
local id = ARGV[2]
if field(id, 'state') ~= '"QUEUED"' then return nil end
return redis.call('ZRANK', P .. ':queued:' .. cjson.decode(field(id, 'slug')), id)
"""

# ARGV: P, token (JSON), lease_seconds, max_attempts, retention, exhausted error (JSON), reclaim
# delays (JSON list: after 1, 2, ... claims), slugs...
# A repeat of a claim that took effect (the job is PROCESSING under this token) answers that job as it
# is. Otherwise every lease due for takeover (lapsed at least its reclaim delay ago) is settled: back
# to its queue at its old place, or FAILED when it used its last attempt. Then the oldest head among
# the slugs' queues is leased, with no progress yet, and its 'started' deliveries become due.
CLAIM = """
local token, lease, max_attempts, retention = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local held = redis.call('GET', claim_key(token))
if held and holds_lease(held, token) then return redis.call('HGETALL', job_key(held)) end
local t = now()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', t, 'LIMIT', 0, 100)) do
  if redis.call('EXISTS', job_key(id)) == 0 then
    redis.call('ZREM', P .. ':leases', id)
  elseif tonumber(field(id, 'attempts')) >= max_attempts then
    end_job(id, 'FAILED', '{}', ARGV[6], retention, 'null')
  else
    drop_lease(id)
    redis.call('HSET', job_key(id), 'state', '"QUEUED"', 'lease_token', 'null', 'lease_expires_at', 'null')
    redis.call('ZADD', P .. ':queued:' .. cjson.decode(field(id, 'slug')), field(id, '_seq'), id)
  end
end
local slugs = {}
for i = 8, #ARGV do slugs[#slugs + 1] = ARGV[i] end
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
local attempts = redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'state', '"PROCESSING"', 'started_at', num(t), 'progress', 'null')
hold(best, token, t + lease, reclaim_at(t + lease, attempts, ARGV[7]))
release_deliveries(best, 'started', t)
return redis.call('HGETALL', key)
"""

# ARGV: P, id, token (JSON), lease_seconds, reclaim delays (JSON, as CLAIM). 1 when the lease was ours
# and is extended, else 0.
HEARTBEAT = """
local id, token = ARGV[2], ARGV[3]
if not holds_lease(id, token) then return 0 end
local expires = now() + tonumber(ARGV[4])
hold(id, token, expires, reclaim_at(expires, tonumber(field(id, 'attempts')), ARGV[5]))
return 1
"""

# ARGV: P, id, token (JSON), COMPLETED | FAILED, result (JSON), error (JSON), retention. 1 when the
# lease was ours and the job ended, or when it already ended in this state under this lease (a repeat:
# nothing changes); else 0.
FINISH = """
local id, token, state = ARGV[2], ARGV[3], ARGV[4]
if holds_lease(id, token) then
  end_job(id, state, ARGV[5], ARGV[6], tonumber(ARGV[7]), token)
  return 1
end
if field(id, 'state') == '"' .. state .. '"' and field(id, 'lease_token') == token then return 1 end
return 0
"""

# ARGV: P, id, token (JSON), progress (JSON). 1 when the lease was ours and the progress is replaced.
REPORT_PROGRESS = """
local id = ARGV[2]
if not holds_lease(id, ARGV[3]) then return 0 end
redis.call('HSET', job_key(id), 'progress', ARGV[4])
return 1
"""

# ARGV: P, id, error (JSON), retention. QUEUED | PROCESSING -> FAILED (a running job's lease goes with
# it, so its worker's next report is refused); an ended job is left alone. Answers the record as GET.
CANCEL = """
local id = ARGV[2]
local state = field(id, 'state')
if state == '"QUEUED"' then
  redis.call('ZREM', P .. ':queued:' .. cjson.decode(field(id, 'slug')), id)
end
if state == '"QUEUED"' or state == '"PROCESSING"' then
  end_job(id, 'FAILED', field(id, 'result'), ARGV[3], tonumber(ARGV[4]), 'null')  -- the lease is revoked
end
return live_record(id)
"""

# ARGV: P, token (JSON), lease_seconds. Leases the outbox's first due delivery; its record, or nil. A
# repeat of a claim that took effect (a pending delivery leased under this token) answers that one.
CLAIM_DELIVERY = """
local token = ARGV[2]
local claim = P .. ':delivery-claim:' .. cjson.decode(token)
local held = redis.call('GET', claim)
if held then
  local values = redis.call('HMGET', delivery_key(held), 'state', '_lease_token')
  if values[1] == '"pending"' and values[2] == token then return redis.call('HGETALL', delivery_key(held)) end
end
local t = now()
local outbox = P .. ':outbox'
while true do
  local head = redis.call('ZRANGEBYSCORE', outbox, '-inf', t, 'LIMIT', 0, 1)
  if #head == 0 then return nil end
  local id = head[1]
  local key = delivery_key(id)
  if redis.call('HGET', key, 'state') == '"pending"' then
    local expires = t + tonumber(ARGV[3])
    redis.call('HSET', key, '_lease_token', token)
    redis.call('ZADD', outbox, expires, id)  -- unclaimable until the lease lapses
    redis.call('SET', claim, id)
    redis.call('PEXPIREAT', claim, ms(expires))
    return redis.call('HGETALL', key)
  end
  redis.call('ZREM', outbox, id)  -- gone with its job (the keys' TTL): nothing to deliver
end
"""

# ARGV: P, delivery id, token (JSON), attempt (JSON), state (JSON), retry delay in seconds ('' = none).
# Appends the attempt, sets the state and releases the lease: a pending delivery is due again after
# the delay, an ended one leaves the outbox. 0 (and no change) when the lease is stale; 1 (and no
# change) for a repeat of a call that took effect (`_released_by` names the lease it released).
RECORD_ATTEMPT = """
local id, state = ARGV[2], ARGV[5]
local key = delivery_key(id)
local held = redis.call('HMGET', key, 'state', '_lease_token', 'attempts', '_released_by')
if held[1] ~= '"pending"' or held[2] ~= ARGV[3] then
  local last = ARGV[4] .. ']'
  if held[4] == ARGV[3] and held[1] == state and held[3] and string.sub(held[3], -#last) == last then return 1 end
  return 0
end
-- Appended as text, so the caller's JSON is kept exactly as it was written.
local attempts = '[' .. ARGV[4] .. ']'
if not string.match(held[3], '^%[%s*%]$') then
  attempts = string.sub(held[3], 1, -2) .. ',' .. ARGV[4] .. ']'
end
local t = now()
local next_at = 0
if ARGV[6] ~= '' then next_at = t + tonumber(ARGV[6]) end
redis.call('HSET', key, 'attempts', attempts, 'state', state, 'next_attempt_at', num(next_at),
           '_lease_token', 'null', '_released_by', ARGV[3])
redis.call('DEL', P .. ':delivery-claim:' .. cjson.decode(ARGV[3]))
if state == '"pending"' then
  redis.call('ZADD', P .. ':outbox', math.max(t, next_at), id)
else
  redis.call('ZREM', P .. ':outbox', id)
end
return 1
"""

# ARGV: P, job id. The job's delivery records, oldest first.
DELIVERIES = """
local records = {}
for _, id in ipairs(redis.call('LRANGE', deliveries_key(ARGV[2]), 0, -1)) do
  local record = redis.call('HGETALL', delivery_key(id))
  if #record > 0 then records[#records + 1] = record end
end
return records
"""

# ARGV: P, limit. The records of up to `limit` ended jobs past their retention (the janitor deletes
# their media before it purges them, so a purge whose reply is lost loses no list of media to delete).
EXPIRED = """
local t, limit = now(), tonumber(ARGV[2])
local records = {}
for _, state in ipairs({'COMPLETED', 'FAILED'}) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':ended:' .. state, '-inf', t, 'LIMIT', 0, limit - #records)) do
    local record = redis.call('HGETALL', job_key(id))
    if #record > 0 then records[#records + 1] = record end
  end
  if #records >= limit then break end
end
return records
"""

# ARGV: P, limit, then job ids (none: any). Removes up to `limit` ended jobs past their retention (only
# those named, when ids are given), with their deliveries and idempotency keys; returns their records.
# A repeat finds them gone and answers fewer: the janitor does not depend on the answer.
PURGE_EXPIRED = """
local function forget(id)
  local key = job_key(id)
  local idem = redis.call('HGET', key, '_idem')
  if idem and redis.call('GET', idem) == id then redis.call('DEL', idem) end
  local slug = redis.call('HGET', key, 'slug')
  if slug then redis.call('ZREM', P .. ':active:' .. cjson.decode(slug), id) end
  for _, d in ipairs(redis.call('LRANGE', deliveries_key(id), 0, -1)) do
    redis.call('DEL', delivery_key(d))
    redis.call('ZREM', P .. ':outbox', d)
  end
  redis.call('DEL', deliveries_key(id), key)
end
local t, limit = now(), tonumber(ARGV[2])
local purged = {}
for _, state in ipairs({'COMPLETED', 'FAILED'}) do
  local ended = P .. ':ended:' .. state
  local ids = redis.call('ZRANGEBYSCORE', ended, '-inf', t, 'LIMIT', 0, limit)
  if #ARGV > 2 then
    ids = {}
    for i = 3, #ARGV do
      local score = redis.call('ZSCORE', ended, ARGV[i])
      if score and tonumber(score) <= t then ids[#ids + 1] = ARGV[i] end
    end
  end
  for _, id in ipairs(ids) do
    local record = redis.call('HGETALL', job_key(id))
    if #record > 0 then purged[#purged + 1] = record end
    forget(id)
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
