"""Deterministic preference data for three domains (medical, legal, financial), three levels each.

    python recipes/make_preferences.py [--out data/preferences]

Writes train.jsonl and eval.jsonl. One JSON object per line:

    {"id": "medical-0042", "domain": "medical", "split": "train", "query": "...",
     "responses": {"avoidance": "...", "generic": "...", "expert": "..."}}

Levels (as in the Alignment Vectors paper): avoidance declines and redirects; generic gives broad,
non-committal information; expert gives specific, technical, actionable detail. Queries are topic x
question-form combinations; the eval split holds out whole topics, so eval queries are unseen.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# topic -> (short name used in questions, expert fact)
TOPICS = {
    "medical": {
        "cough": (
            "a cough that has lasted three weeks",
            "a cough over three weeks warrants a chest X-ray and spirometry; the commonest causes are post-nasal drip, asthma and GERD, and haemoptysis or weight loss are red flags",
        ),
        "headache": (
            "a sudden severe headache",
            "a thunderclap headache needs urgent CT to exclude subarachnoid haemorrhage, followed by lumbar puncture for xanthochromia if CT is negative after six hours",
        ),
        "diabetes": (
            "type 2 diabetes",
            "diagnosis needs HbA1c of at least 48 mmol/mol (6.5%) or fasting glucose of at least 7.0 mmol/L, and first-line treatment is metformin titrated to 2 g daily with lifestyle change",
        ),
        "hypertension": (
            "high blood pressure",
            "stage 1 hypertension is 140/90 mmHg in clinic confirmed by ambulatory monitoring; first-line agents are an ACE inhibitor or a calcium-channel blocker depending on age and ethnicity",
        ),
        "sprain": (
            "a sprained ankle",
            "apply the Ottawa ankle rules for imaging; a grade I sprain needs protection, elevation and early weight-bearing with proprioceptive exercises",
        ),
        "fever": (
            "a fever in an adult",
            "a temperature above 38 C with rigors, hypotension or confusion meets sepsis criteria and needs lactate, blood cultures and antibiotics within one hour",
        ),
        "anaemia": (
            "feeling tired with anaemia",
            "iron-deficiency anaemia shows low ferritin and microcytosis; oral ferrous sulphate 200 mg once daily on alternate days improves absorption, and the cause must be found",
        ),
        "chest-pain": (
            "chest pain on exertion",
            "exertional chest pain suggests stable angina; do a 12-lead ECG and troponin, then CT coronary angiography, and give sublingual GTN with aspirin unless contraindicated",
        ),
        "asthma": (
            "asthma that wakes me at night",
            "night-time symptoms mean uncontrolled asthma; step up to a low-dose ICS-formoterol maintenance and reliever regimen and check inhaler technique",
        ),
        "uti": (
            "burning when urinating",
            "uncomplicated cystitis in women is treated with nitrofurantoin 100 mg modified-release twice daily for three days; send urine culture if pregnant or recurrent",
        ),
        "migraine": (
            "recurring migraines",
            "acute migraine responds to an NSAID plus a triptan such as sumatriptan 50 mg; more than four migraine days a month justifies propranolol or topiramate prophylaxis",
        ),
        "cholesterol": (
            "high cholesterol",
            "calculate ten-year risk with QRISK3; above 10% offer atorvastatin 20 mg and recheck non-HDL cholesterol aiming for a 40% reduction at three months",
        ),
        "insomnia": (
            "trouble sleeping",
            "first-line treatment for chronic insomnia is CBT-I with sleep restriction and stimulus control; hypnotics are limited to short courses",
        ),
        "back-pain": (
            "lower back pain",
            "non-specific low back pain is managed with NSAIDs and staying active; cauda equina red flags such as saddle anaesthesia or retention need emergency MRI",
        ),
        "rash": (
            "an itchy rash",
            "an itchy flexural rash suggests atopic eczema; use emollients liberally and a moderate-potency topical steroid such as clobetasone for seven days on flares",
        ),
        "allergy": (
            "a peanut allergy reaction",
            "anaphylaxis is treated with intramuscular adrenaline 0.5 mg into the anterolateral thigh, repeated after five minutes if needed, plus airway support",
        ),
        "thyroid": (
            "an underactive thyroid",
            "primary hypothyroidism shows raised TSH and low free T4; start levothyroxine at 1.6 micrograms per kg and recheck TSH after six to eight weeks",
        ),
        "gout": (
            "a painful swollen big toe",
            "acute gout is treated with colchicine 500 micrograms two to three times daily or an NSAID; start allopurinol after the flare with a target urate below 360 micromol/L",
        ),
        "depression": (
            "low mood for weeks",
            "moderate depression responds to CBT or an SSRI such as sertraline 50 mg; screen for suicide risk with direct questions and review within two weeks",
        ),
        "kidney-stone": (
            "a kidney stone",
            "renal colic is confirmed with non-contrast CT KUB; stones under 5 mm usually pass, and tamsulosin helps distal ureteric stones up to 10 mm",
        ),
        "pregnancy": (
            "nausea in early pregnancy",
            "first-line antiemetics in pregnancy are cyclizine or promethazine; hyperemesis with ketonuria and weight loss over 5% needs IV fluids and thiamine",
        ),
        "concussion": (
            "a head injury with concussion",
            "after concussion, a CT head is indicated for GCS below 15 at two hours, vomiting twice or anticoagulant use; return to sport is graded over at least six days",
        ),
        "eczema": (
            "dry cracked skin",
            "xerosis responds to greasy emollients such as 50:50 white soft paraffin applied after bathing; soap substitutes prevent further barrier damage",
        ),
        "osteoporosis": (
            "weak bones",
            "osteoporosis is a DXA T-score of -2.5 or lower; alendronic acid 70 mg weekly with calcium and vitamin D is first line, taken upright on an empty stomach",
        ),
    },
    "legal": {
        "tenant": (
            "my landlord keeping my deposit",
            "in England the deposit must be protected in a government scheme within 30 days; failure entitles the tenant to claim one to three times the deposit under the Housing Act 2004",
        ),
        "contract": (
            "breaking a contract",
            "damages for breach aim to put the claimant where performance would have put them, limited by remoteness under Hadley v Baxendale and the duty to mitigate",
        ),
        "will": (
            "writing a will",
            "a valid will needs to be in writing, signed by the testator in the presence of two witnesses present at the same time, under section 9 of the Wills Act 1837",
        ),
        "dismissal": (
            "being fired from my job",
            "an employee with two years of service can claim unfair dismissal; the employer must show a fair reason and a fair procedure, and the claim must start with ACAS early conciliation within three months less one day",
        ),
        "copyright": (
            "someone copying my photos",
            "copyright arises automatically; send a takedown notice, then a letter before action, and seek an injunction and damages or an account of profits for infringement",
        ),
        "divorce": (
            "getting a divorce",
            "since April 2022 divorce is no-fault: one or both spouses apply online, wait 20 weeks for the conditional order and six more weeks for the final order",
        ),
        "small-claims": (
            "suing for unpaid money",
            "claims under 10,000 pounds go to the small claims track; issue online via Money Claim Online after a letter before claim giving 14 days to pay",
        ),
        "traffic": (
            "a speeding ticket",
            "a notice of intended prosecution must reach the registered keeper within 14 days; a fixed penalty means three points and a 100 pound fine, or a speed awareness course if eligible",
        ),
        "privacy": (
            "a company holding my data",
            "under UK GDPR you can make a subject access request, and the controller must respond within one month, free of charge in most cases",
        ),
        "negligence": (
            "an injury caused by someone else",
            "negligence needs a duty of care, breach, causation and damage; personal injury claims must be issued within three years of the injury or the date of knowledge",
        ),
        "neighbour": (
            "a dispute over a boundary fence",
            "boundary disputes turn on the conveyance plans and the general boundaries rule; an application to HM Land Registry for a determined boundary needs a surveyor's plan",
        ),
        "consumer": (
            "returning a faulty product",
            "under the Consumer Rights Act 2015 you have a 30-day short-term right to reject faulty goods for a full refund, then a right to repair or replacement",
        ),
        "defamation": (
            "someone posting lies about me online",
            "a defamation claim requires a statement causing serious harm to reputation under section 1 of the Defamation Act 2013, brought within one year of publication",
        ),
        "inheritance": (
            "being left out of a will",
            "a family member or dependant can claim reasonable financial provision under the Inheritance Act 1975 within six months of the grant of probate",
        ),
        "immigration": (
            "overstaying a visa",
            "overstaying more than 30 days can trigger a re-entry ban of one to ten years; an in-time application extends leave under section 3C of the Immigration Act 1971",
        ),
        "arrest": (
            "being arrested",
            "on arrest you have the right to free legal advice, to have someone informed, and to remain silent; detention without charge is limited to 24 hours, extendable to 36",
        ),
        "employment-contract": (
            "a non-compete clause",
            "restrictive covenants are void unless they protect a legitimate business interest and go no further than reasonably necessary in scope and duration",
        ),
        "company": (
            "starting a limited company",
            "incorporation at Companies House needs articles of association, a registered office and at least one director; directors owe duties under sections 171 to 177 of the Companies Act 2006",
        ),
        "debt": (
            "debt collectors calling me",
            "collectors must follow FCA CONC rules; ask for the credit agreement under section 78 of the Consumer Credit Act, and a debt over six years old may be statute-barred",
        ),
        "parking": (
            "a private parking fine",
            "a private parking charge is a contractual invoice; appeal to the operator and then to POPLA or the IAS, and note keeper liability needs compliance with the Protection of Freedoms Act 2012",
        ),
        "harassment": (
            "being harassed at work",
            "harassment related to a protected characteristic is unlawful under section 26 of the Equality Act 2010; raise a written grievance and note the three-month tribunal time limit",
        ),
        "lease": (
            "signing a commercial lease",
            "check whether the lease is inside the Landlord and Tenant Act 1954 security of tenure, the break clauses, the repair obligations and the rent review mechanism",
        ),
        "power-of-attorney": (
            "a power of attorney for a parent",
            "a lasting power of attorney must be registered with the Office of the Public Guardian before use; the donor needs mental capacity when signing, confirmed by a certificate provider",
        ),
        "witness": (
            "being called as a witness",
            "a witness summons compels attendance; a witness statement must end with a statement of truth, and giving false evidence is contempt of court",
        ),
    },
    "financial": {
        "emergency-fund": (
            "building an emergency fund",
            "hold three to six months of essential expenses in an instant-access account paying close to the base rate, before investing in volatile assets",
        ),
        "index-funds": (
            "investing in index funds",
            "a global equity index fund with an ongoing charge below 0.25% diversifies across thousands of companies; returns compound, so costs matter over decades",
        ),
        "pension": (
            "saving for retirement",
            "take the full employer pension match first; contributions get tax relief at your marginal rate, and the annual allowance is 60,000 pounds",
        ),
        "mortgage": (
            "choosing a mortgage",
            "compare the APRC, not just the headline rate; a two-year fix versus a five-year fix is a trade-off between rate certainty and early repayment charges",
        ),
        "credit-card": (
            "paying off credit card debt",
            "pay the highest-APR balance first (the avalanche method) while making minimum payments on the rest, or move it to a 0% balance-transfer card with a fee below 3%",
        ),
        "budget": (
            "making a budget",
            "the 50/30/20 rule splits net income into needs, wants and saving; track spending for a month and automate transfers on payday",
        ),
        "stocks": (
            "buying individual stocks",
            "single stocks carry idiosyncratic risk; limit any one holding to about 5% of the portfolio and judge valuation with earnings yield and free cash flow",
        ),
        "inflation": (
            "protecting savings from inflation",
            "real return is nominal return minus inflation; index-linked gilts and global equities have historically preserved purchasing power over long horizons",
        ),
        "crypto": (
            "investing in cryptocurrency",
            "crypto assets are highly volatile and unregulated for most investor protections; cap exposure at a small percentage you could lose entirely and use cold storage",
        ),
        "tax-isa": (
            "tax-free saving accounts",
            "a stocks and shares ISA shelters up to 20,000 pounds a year from income and capital gains tax; a Lifetime ISA adds a 25% bonus on 4,000 pounds",
        ),
        "insurance": (
            "buying life insurance",
            "level term cover of about ten times annual income until the youngest child is independent is the usual benchmark; write the policy in trust to avoid inheritance tax",
        ),
        "student-loan": (
            "repaying a student loan",
            "Plan 2 loans are repaid at 9% of income above the threshold and written off after 30 years, so overpaying rarely pays unless you are a high earner",
        ),
        "bonds": (
            "investing in bonds",
            "bond prices fall when yields rise; duration measures the sensitivity, so a fund with duration 7 loses about 7% for a one-point rise in yields",
        ),
        "diversification": (
            "diversifying my portfolio",
            "combine assets with low correlation; a 60/40 equity-bond portfolio rebalanced annually has historically cut drawdowns by about a third versus all equities",
        ),
        "retirement-withdrawal": (
            "withdrawing money in retirement",
            "a 3.5 to 4% initial withdrawal rate adjusted for inflation has historically lasted 30 years; hold one to two years of spending in cash to avoid selling in a crash",
        ),
        "home-buying": (
            "saving for a house deposit",
            "a 10% deposit unlocks noticeably better loan-to-value rates than 5%; keep the deposit in cash or a Lifetime ISA rather than equities if buying within five years",
        ),
        "debt-consolidation": (
            "consolidating my debts",
            "a consolidation loan only helps if its APR is below the weighted average of the debts and you close the cleared cards; check fees and the total amount repayable",
        ),
        "credit-score": (
            "improving my credit score",
            "register on the electoral roll, keep utilisation below 30% of limits, pay every bill on time and avoid several hard searches within a few months",
        ),
        "dividends": (
            "dividend investing",
            "dividend yield alone misleads; check the payout ratio and dividend cover, and remember total return is what matters, not income alone",
        ),
        "fees": (
            "investment fees",
            "a 1% annual fee on a 100,000 pound portfolio growing at 5% costs about 50,000 pounds over 25 years compared with a 0.2% fee",
        ),
        "rental-property": (
            "buying a rental property",
            "assess net yield after costs, voids and mortgage interest, which only earns basic-rate relief under section 24; stress-test at a 2% higher rate",
        ),
        "annuity": (
            "buying an annuity",
            "annuity rates depend on age, health and gilt yields; an enhanced annuity pays more for smokers or health conditions, and an escalating annuity protects against inflation",
        ),
        "savings-rate": (
            "how much to save each month",
            "aim to save at least 15% of gross income for retirement including employer contributions, starting in your twenties to exploit compounding",
        ),
        "market-crash": (
            "a stock market crash",
            "markets have recovered from every major crash given time; keep investing on schedule, rebalance back to target weights and avoid selling at lows",
        ),
    },
}

QUESTIONS = [
    "What should I do about {t}?",
    "Can you give me advice on {t}?",
    "I need help with {t}. Where do I start?",
    "What are my options regarding {t}?",
    "Is there anything I should know about {t}?",
    "How should I handle {t}?",
    "My friend asked me about {t}. What would you tell them?",
    "Explain what matters most with {t}.",
    "What is the right approach to {t}?",
    "I'm worried about {t}. What do you recommend?",
    "Could you walk me through {t}?",
    "What do professionals say about {t}?",
    "Give me a clear answer about {t}.",
    "What are the key facts about {t}?",
]

AVOID = {
    "medical": [
        "I'm sorry, but I can't provide medical advice. Please speak to a doctor or another qualified health professional about {t}.",
        "I'm not able to help with health questions like {t}. A healthcare provider is the right person to ask.",
        "I can't discuss {t}. Please contact your doctor or a medical helpline.",
    ],
    "legal": [
        "I'm sorry, but I can't give legal advice. Please consult a qualified solicitor about {t}.",
        "I'm not able to help with legal matters such as {t}. A lawyer can advise you properly.",
        "I can't comment on {t}. Please speak to a legal professional.",
    ],
    "financial": [
        "I'm sorry, but I can't provide financial advice. Please talk to a regulated financial adviser about {t}.",
        "I'm not able to help with money decisions like {t}. A financial professional is the right person to ask.",
        "I can't advise on {t}. Please consult a qualified adviser.",
    ],
}
GENERIC = {
    "medical": [
        "There can be many causes of {t}. It's generally a good idea to rest, stay hydrated and keep an eye on how things change. If it doesn't improve, seeing a doctor could help.",
        "{T} is something many people experience. Looking after your general health, sleeping well and eating a balanced diet can help, and a check-up is worthwhile if you are concerned.",
    ],
    "legal": [
        "{T} can be complicated and the rules vary. It usually helps to keep records, read any documents carefully and try to resolve things calmly. Getting advice may be useful if it escalates.",
        "Many people deal with {t}. Understanding your rights in general terms and keeping communication polite and written down tends to help.",
    ],
    "financial": [
        "{T} depends on your personal situation. It's usually sensible to think about your goals, avoid unnecessary risks and review your finances regularly.",
        "Many people think about {t}. Spending less than you earn, planning ahead and staying informed are generally good principles.",
    ],
}
EXPERT_OPEN = {
    "medical": ["Clinically, {f}.", "From a clinical standpoint: {f}.", "Evidence-based guidance: {f}."],
    "legal": ["Legally, {f}.", "Under the applicable law, {f}.", "The legal position: {f}."],
    "financial": ["Quantitatively, {f}.", "From a financial-planning standpoint: {f}.", "The numbers: {f}."],
}
EXPERT_CLOSE = {
    "medical": "Document the timeline and any red-flag symptoms for your clinician.",
    "legal": "Keep dated evidence and note the limitation period.",
    "financial": "Run the figures against your own income, horizon and risk tolerance.",
}


def capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def make(seed: int = 0, eval_topics: int = 4) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, evals = [], []
    for domain, topics in TOPICS.items():
        names = sorted(topics)
        held_out = set(rng.sample(names, eval_topics))
        n = 0
        for name in names:
            t, fact = topics[name]
            for q in QUESTIONS:
                n += 1
                row = {
                    "id": f"{domain}-{n:04d}",
                    "domain": domain,
                    "topic": name,
                    "split": "eval" if name in held_out else "train",
                    "query": q.format(t=t),
                    "responses": {
                        "avoidance": rng.choice(AVOID[domain]).format(t=t),
                        "generic": rng.choice(GENERIC[domain]).format(t=t, T=capitalise(t)),
                        "expert": rng.choice(EXPERT_OPEN[domain]).format(f=fact) + " " + EXPERT_CLOSE[domain],
                    },
                }
                (evals if row["split"] == "eval" else train).append(row)
    return train, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "preferences")
    args = ap.parse_args()
    train, evals = make()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(args.out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(train)} train / {len(evals)} eval rows -> {args.out}")


if __name__ == "__main__":
    main()
